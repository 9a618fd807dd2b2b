"""Feature files: one row of features per image, every caption pointing at its row.

The layout is ClipCap's, so its `train.py` reads our files and we read its files:
    {"clip_embedding": FloatTensor[N, D],
     "captions": [{"image_id", "caption", "clip_embedding": row, ...}],
     "meta": {...}}                                   # ours only; ClipCap's files have none
Reading goes through a restricted unpickler: pickles are programs, and these files come
from other people.
"""

import collections
import hashlib
import io
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.atomic import atomic_write
from data.errors import InputError

FEATURES_KEY = "clip_embedding"  # ClipCap's name, kept for DINOv2 features too


@dataclass
class FeatureFile:
    """The contents of a feature file, checked."""

    embeddings: torch.Tensor  # (N, D) float32, one row per image
    captions: list[dict]  # each with "image_id", "caption" and "clip_embedding" (its row)
    meta: dict = field(default_factory=dict)

    @property
    def feature_dim(self) -> int:
        return self.embeddings.shape[1]

    def embeddings_digest(self) -> str:
        """A short hash of the feature values, to tell two files with the same captions apart."""
        return hashlib.sha256(self.embeddings.contiguous().numpy().tobytes()).hexdigest()[:16]

    def image_rows(self) -> dict[Any, int]:
        """Image id -> row, in row order (the first caption of an image names its row)."""
        rows: dict[Any, int] = {}
        for caption in self.captions:
            rows.setdefault(caption["image_id"], caption[FEATURES_KEY])
        return rows


def _load_storage_from_bytes(data: bytes) -> Any:
    # A tensor pickled with plain pickle carries its storage as bytes written by torch.save.
    # torch's own hook unpickles those bytes unrestricted; here they go through the weights-only loader.
    return torch.load(io.BytesIO(data), weights_only=True)


try:  # numpy >= 2 moved its core; pickles written by numpy 1 still name the old module
    from numpy._core.multiarray import _reconstruct as _numpy_reconstruct
except ImportError:
    from numpy.core.multiarray import _reconstruct as _numpy_reconstruct


def _numpy_frombuffer(buffer: bytes, dtype: np.dtype, shape: tuple, order: str) -> np.ndarray:
    # How pickle protocol 5 rebuilds an array (numpy's own _frombuffer), copied so it is writable.
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order).copy()


def _latin1_bytes(text: str, encoding: str) -> bytes:
    # Pickle protocol 2 stores bytes as `_codecs.encode(text, "latin1")`; nothing else is let through.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refuses _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


# Everything a feature file may import: tensors (ClipCap pickles torch tensors), numpy arrays
# (some forks store those) and ordered dicts. Nothing here runs code of the file's choosing.
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("_codecs", "encode"): _latin1_bytes,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain data, torch tensors and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(
                f"refuses to load '{module}.{name}' (a feature file holds only tensors and data)"
            )
        return allowed


def restricted_load(path: str | os.PathLike) -> Any:
    """Load a pickle with RestrictedUnpickler; any failure is an InputError naming the file."""
    try:
        with open(path, "rb") as handle:
            return RestrictedUnpickler(handle).load()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as error:  # a directory, no permission, an I/O error
        raise InputError(f"{path}: cannot be read ({error.strerror or error})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, RuntimeError) as error:
        raise InputError(f"{path}: not a readable feature file: {error}") from None


def _as_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    return value if isinstance(value, torch.Tensor) else None


def read_feature_file(path: str | os.PathLike) -> FeatureFile:
    """Read and check a feature file (ours or ClipCap's); bad content is one InputError line."""
    content = restricted_load(path)
    if not isinstance(content, dict):
        raise InputError(f"{path}: expected a dict with '{FEATURES_KEY}' and 'captions', got {type(content).__name__}")
    missing = [key for key in (FEATURES_KEY, "captions") if key not in content]
    if missing:
        raise InputError(f"{path}: missing key(s) {', '.join(repr(key) for key in missing)}")
    embeddings = _as_tensor(content[FEATURES_KEY])
    if embeddings is None or embeddings.dim() != 2:
        raise InputError(f"{path}: '{FEATURES_KEY}' must be a 2-D tensor (images x features)")
    captions = content["captions"]
    if not isinstance(captions, list) or not captions:
        raise InputError(f"{path}: 'captions' is empty or not a list")
    num_rows = embeddings.shape[0]
    for number, caption in enumerate(captions):
        if not isinstance(caption, dict) or not isinstance(caption.get("caption"), str) or "image_id" not in caption:
            raise InputError(f"{path}: caption {number} needs 'image_id' and a string 'caption'")
        row = caption.get(FEATURES_KEY)
        if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < num_rows:
            raise InputError(f"{path}: caption {number} has row index {row!r}, outside 0..{num_rows - 1}")
    meta = content.get("meta") or {}
    if not isinstance(meta, dict) or not isinstance(meta.get("encoder", {}), dict):
        raise InputError(f"{path}: 'meta' must be a dict, and its 'encoder' a dict when present")
    return FeatureFile(embeddings.float().contiguous(), captions, dict(meta))


def write_feature_file(path: str | os.PathLike, features: FeatureFile) -> None:
    """Write a feature file atomically, in the layout ClipCap's train.py reads."""
    content = {
        FEATURES_KEY: features.embeddings.detach().float().cpu().contiguous(),
        "captions": features.captions,
        "meta": features.meta,
    }
    with atomic_write(Path(path)) as handle:
        pickle.dump(content, handle, protocol=pickle.HIGHEST_PROTOCOL)
