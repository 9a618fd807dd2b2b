"""Feature files: one row of features per image, every caption pointing at its row.

The layout is ClipCap's, so its `train.py` reads our files and we read its files:
    {"clip_embedding": FloatTensor[N, D],             # or [N, T, D]: a token matrix per image (patch_tokens)
     "captions": [{"image_id", "caption", "clip_embedding": row, ...}],
     "meta": {...}}                                   # ours only; ClipCap's files have none
Reading goes through a restricted unpickler: pickles are programs, and these files come
from other people.
"""

import collections
import hashlib
import io
import math
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.atomic import atomic_write
from data.errors import InputError

FEATURES_KEY = "clip_embedding"  # ClipCap's name, kept for DINOv2 features too
# A pickle is built, written and read whole in memory: token features (patch_tokens, T x D floats per image)
# past this size go to a feature store. 2 GiB is ~14,000 images of ViT-B/32 tokens (50 x 768), ~2,700 of
# DINOv2-B's (257 x 768); one vector per image has no limit, as before.
MAX_PICKLE_TOKEN_BYTES = 2 * 1024**3
IMAGE_MODALITY = "image"  # what a feature file without meta["modality"] holds: extraction's
TEXT_MODALITY = "text"  # meta["modality"] of a sentence corpus's text embeddings (parse_corpus.py)


@dataclass
class FeatureFile:
    """The contents of a feature file, checked."""

    # (N, D) float32, one row per image, or (N, T, D) for token features (patch_tokens): a tensor, or a
    # store's memory-mapped rows (data.store.ShardedEmbeddings)
    embeddings: Any
    # each with "image_id", "caption" and "clip_embedding" (its row): a list, or a store's data.store.CaptionTable
    captions: Sequence[dict]
    meta: dict = field(default_factory=dict)

    @property
    def feature_dim(self) -> int:
        """D: the width of a row, or of each of its tokens."""
        return self.embeddings.shape[-1]

    @property
    def row_shape(self) -> tuple[int, ...]:
        """One image's features: (D,), or (T, D) for token features."""
        return tuple(self.embeddings.shape[1:])

    @property
    def token_count(self) -> int | None:
        """T, the tokens per image of token features (patch_tokens); None for one vector per image."""
        return self.row_shape[0] if len(self.row_shape) == 2 else None

    def embeddings_digest(self) -> str:
        """A short hash of the feature values, to tell two files with the same captions apart."""
        if hasattr(self.embeddings, "digest"):  # a store: from its shards' checksums, never by reading them
            return self.embeddings.digest
        return hashlib.sha256(self.embeddings.contiguous().numpy().tobytes()).hexdigest()[:16]

    @property
    def modality(self) -> str:
        """What the rows embed: "text" for a parse_corpus.py corpus, else "image" (extraction records none)."""
        return self.meta.get("modality") or IMAGE_MODALITY

    def image_rows(self) -> dict[Any, int]:
        """Image id -> row, in row order (the first caption of an image names its row)."""
        rows: dict[Any, int] = {}
        for caption in self.captions:
            rows.setdefault(caption["image_id"], caption[FEATURES_KEY])
        return rows


def _load_storage_from_bytes(data: bytes) -> Any:
    # A tensor pickled with plain pickle carries its storage as bytes written by torch.save.
    # torch's own hook unpickles those bytes unrestricted; here they go through the weights-only loader,
    # whose refusal runs to many lines: one line of it is kept, without its advice to load unrestricted.
    try:
        storage = torch.load(io.BytesIO(data), weights_only=True)
    except Exception as error:  # torch raises many types for bytes it refuses or cannot parse
        lines = str(error).splitlines()
        detail = next((line.strip() for line in lines if "Unsupported" in line), type(error).__name__)
        raise pickle.UnpicklingError(f"a tensor's storage holds more than tensor data ({detail})") from None
    if not isinstance(storage, torch.storage.TypedStorage | torch.UntypedStorage):
        raise pickle.UnpicklingError(f"a tensor's storage bytes hold a {type(storage).__name__}, not a storage")
    return storage


def _check_view(shape: tuple, strides: tuple, offset: int, buffer_elements: int) -> None:
    # A pickle chooses its own shape and strides: zero strides would show a 4-byte buffer as gigabytes,
    # which the first copy would then allocate. A view may hold no more elements than its buffer.
    elements = 1
    for size in shape:
        elements *= size
    if (
        any(size < 0 for size in shape)
        or len(strides) != len(shape)
        or any(stride < 1 and size > 1 for size, stride in zip(shape, strides))
        or elements > max(buffer_elements - offset, 0)
    ):
        raise pickle.UnpicklingError(
            f"an array of shape {tuple(shape)} and strides {tuple(strides)} does not fit its buffer of {buffer_elements} elements"
        )


def _rebuild_tensor_checked(storage: Any, storage_offset: int, size: tuple, stride: tuple, *rest: Any) -> torch.Tensor:
    # torch._utils._rebuild_tensor(_v2) with the view checked first (both are views: nothing is allocated yet).
    if not isinstance(storage, torch.storage.TypedStorage | torch.UntypedStorage):
        raise pickle.UnpicklingError(f"a tensor's storage is a {type(storage).__name__}")
    # In elements of the storage's type (bytes for an untyped one); TypedStorage.size() warns of its deprecation.
    elements = storage._size() if isinstance(storage, torch.storage.TypedStorage) else storage.nbytes()
    _check_view(tuple(size), tuple(stride), storage_offset, elements)
    rebuild = torch._utils._rebuild_tensor_v2 if rest else torch._utils._rebuild_tensor
    return rebuild(storage, storage_offset, size, stride, *rest)


class _NumpyArrayType:
    """Stands for numpy.ndarray as _reconstruct's class argument; called itself, ndarray(shape, dtype,
    buffer, offset, strides) would build any view of any buffer, so the real class is never handed out."""

    def __new__(cls, *args: Any, **kwargs: Any) -> None:
        raise pickle.UnpicklingError("refuses to call numpy.ndarray (it would view a buffer with any strides)")


try:  # numpy >= 2 moved its core; pickles written by numpy 1 still name the old module
    from numpy._core.multiarray import _reconstruct as _numpy_reconstruct
except ImportError:
    from numpy.core.multiarray import _reconstruct as _numpy_reconstruct


def _numpy_reconstruct_checked(subtype: Any, shape: tuple, typecode: Any) -> np.ndarray:
    # The empty array that __setstate__ then fills (numpy checks there that the data matches the shape).
    if subtype is not _NumpyArrayType:
        raise pickle.UnpicklingError("refuses numpy _reconstruct of anything but numpy.ndarray")
    # numpy always asks for (0,) here; any other shape would be allocated before a byte of its data is seen.
    if shape != (0,):
        raise pickle.UnpicklingError(f"refuses numpy _reconstruct of a non-empty shape {shape!r}")
    return _numpy_reconstruct(np.ndarray, shape, typecode)


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
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_checked,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor_checked,
    ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct_checked,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct_checked,
    ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("_codecs", "encode"): _latin1_bytes,
    ("numpy", "ndarray"): _NumpyArrayType,
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
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InputError(f"{path}: not a readable feature file: {reason}") from None
    except RecursionError:
        raise InputError(f"{path}: not a readable feature file: nested too deeply") from None


MAX_BAD_ROWS_SHOWN = 5


def _as_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, np.ndarray):
        try:
            value = torch.from_numpy(value)
        except TypeError:  # an object or string array: not features
            return None
    return value if isinstance(value, torch.Tensor) else None


def nonfinite_rows(embeddings: torch.Tensor) -> list[int]:
    """Rows (images) holding NaN or infinity anywhere (a broken encoder pass), in order; (N, D) or (N, T, D)."""
    # A sum is one pass and no mask (a store's reads are checked batch by batch): NaN or infinity anywhere
    # makes it non-finite. Only then, or when large finite values overflow it, are the rows looked at.
    if math.isfinite(embeddings.sum(dtype=torch.float32)):
        return []
    return torch.nonzero(~torch.isfinite(embeddings).flatten(1).all(dim=1)).flatten().tolist()


def first_rows(rows: Sequence[Any]) -> str:
    """The first MAX_BAD_ROWS_SHOWN of `rows`, comma-separated, for a one-line message."""
    return ", ".join(map(str, rows[:MAX_BAD_ROWS_SHOWN])) + (", ..." if len(rows) > MAX_BAD_ROWS_SHOWN else "")


def refuse_nonfinite_rows(where: str | os.PathLike, rows: Sequence[int]) -> None:
    """One InputError line naming `where` and `rows`, its feature rows holding NaN or infinity (if there are any)."""
    if rows:
        raise InputError(f"{where}: {len(rows)} feature row(s) hold NaN or infinite values (rows {first_rows(rows)})")


def _check_embeddings(path: str | os.PathLike, embeddings: torch.Tensor) -> None:
    # Caught here, a NaN row or an empty width names the file; caught in training, it looks like a bad --lr.
    if embeddings.shape[0] == 0:
        raise InputError(f"{path}: '{FEATURES_KEY}' has no rows")
    if embeddings.shape[-1] == 0:
        raise InputError(f"{path}: '{FEATURES_KEY}' has {embeddings.shape[0]} rows of width 0: no features")
    if embeddings.dim() == 3 and embeddings.shape[1] == 0:
        raise InputError(f"{path}: '{FEATURES_KEY}' has {embeddings.shape[0]} rows of 0 tokens: no features")
    refuse_nonfinite_rows(path, nonfinite_rows(embeddings))


def _is_image_id(value: Any) -> bool:
    # Ids are keys (of image rows, references, predictions): a list or a dict there fails far from the file.
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def read_feature_file(path: str | os.PathLike) -> FeatureFile:
    """Read and check a feature file (ours or ClipCap's); bad content is one InputError line."""
    content = restricted_load(path)
    if not isinstance(content, dict):
        raise InputError(f"{path}: expected a dict with '{FEATURES_KEY}' and 'captions', got {type(content).__name__}")
    missing = [key for key in (FEATURES_KEY, "captions") if key not in content]
    if missing:
        raise InputError(f"{path}: missing key(s) {', '.join(repr(key) for key in missing)}")
    embeddings = _as_tensor(content[FEATURES_KEY])
    if embeddings is None or embeddings.dim() not in (2, 3) or embeddings.is_complex():
        raise InputError(
            f"{path}: '{FEATURES_KEY}' must be a 2-D or 3-D real tensor (images x features, or images x tokens x features)"
        )
    if not embeddings.is_floating_point():  # integers or booleans are ids or masks, never an encoder's output
        dtype = str(embeddings.dtype).removeprefix("torch.")
        raise InputError(f"{path}: '{FEATURES_KEY}' holds {dtype} values, not floating-point features")
    embeddings = embeddings.float().contiguous()
    _check_embeddings(path, embeddings)
    captions = content["captions"]
    if not isinstance(captions, list) or not captions:
        raise InputError(f"{path}: 'captions' is empty or not a list")
    num_rows = embeddings.shape[0]
    for number, caption in enumerate(captions):
        if (
            not isinstance(caption, dict)
            or not isinstance(caption.get("caption"), str)
            or not _is_image_id(caption.get("image_id"))
        ):
            raise InputError(f"{path}: caption {number} needs an 'image_id' (a number or text) and a string 'caption'")
        row = caption.get(FEATURES_KEY)
        if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < num_rows:
            raise InputError(f"{path}: caption {number} has row index {row!r}, outside 0..{num_rows - 1}")
    meta = content.get("meta") or {}
    if not isinstance(meta, dict) or not isinstance(meta.get("encoder", {}), dict):
        raise InputError(f"{path}: 'meta' must be a dict, and its 'encoder' a dict when present")
    return FeatureFile(embeddings, captions, dict(meta))


# The encoder fields that decide what a feature means; the preprocessing sizes only shift it a little.
ENCODER_IDENTITY = ("family", "name", "feature_type")


def _encoder_identity(encoder: dict) -> tuple:
    # A local copy of a hub model (/models/dinov2-base) counts as that model (facebook/dinov2-base).
    return tuple(Path(str(encoder.get(key))).name if key == "name" else encoder.get(key) for key in ENCODER_IDENTITY)


def _describe_encoder(encoder: dict) -> str:
    return f"{encoder.get('family')} {encoder.get('name')} ({encoder.get('feature_type')})"


def check_same_encoder(features: FeatureFile, source: str, encoder: dict | None, expected_by: str) -> None:
    """Refuse features of another encoder than `encoder` (what `expected_by` records), even of the same
    width (CLIP ViT-L/14 and DINOv2-B are both 768-d). A file or a model recording none is not checked."""
    recorded = features.meta.get("encoder")
    if not recorded or not encoder or _encoder_identity(recorded) == _encoder_identity(encoder):
        return
    raise InputError(
        f"{source} holds features of {_describe_encoder(recorded)}, but {expected_by} expects {_describe_encoder(encoder)}"
    )


def check_pickle_fits(path: str | os.PathLike, num_images: int, row_shape: Sequence[int]) -> None:
    """Refuse, before any work, a pickle of token features larger than MAX_PICKLE_TOKEN_BYTES (as float32)."""
    if len(row_shape) < 2:
        return
    size = num_images * 4 * int(np.prod(row_shape))
    if size > MAX_PICKLE_TOKEN_BYTES:
        shape = " x ".join(map(str, row_shape))
        raise InputError(
            f"{path}: {num_images} images of {shape} token features are {_binary_size(size)} as float32, over the "
            f"pickle's limit of {_binary_size(MAX_PICKLE_TOKEN_BYTES)}; write a feature store instead (--output_format shards)"
        )


def _binary_size(size: int) -> str:
    power = min(3, max(0, (size.bit_length() - 1) // 10))  # 0 bytes, 1 KiB, 2 MiB, 3 GiB
    return f"{size / 1024**power:.4g} {('bytes', 'KiB', 'MiB', 'GiB')[power]}"


def write_feature_file(path: str | os.PathLike, features: FeatureFile) -> None:
    """Write a feature file atomically, in the layout ClipCap's train.py reads."""
    content = {
        FEATURES_KEY: features.embeddings.detach().float().cpu().contiguous(),
        "captions": features.captions,
        "meta": features.meta,
    }
    with atomic_write(Path(path)) as handle:
        pickle.dump(content, handle, protocol=pickle.HIGHEST_PROTOCOL)


def select_images(features: FeatureFile, image_ids: set) -> FeatureFile:
    """The rows of `image_ids` (in file order) and their captions, rows renumbered; the meta kept, its counts
    updated."""
    captions = [caption for caption in features.captions if caption["image_id"] in image_ids]
    old_rows = sorted({caption[FEATURES_KEY] for caption in captions})
    new_row = {old: new for new, old in enumerate(old_rows)}
    embeddings = torch.as_tensor(np.asarray(features.embeddings[old_rows]))  # (n, D) of the kept images
    captions = [{**caption, FEATURES_KEY: new_row[caption[FEATURES_KEY]]} for caption in captions]
    counts = {"num_images": len(old_rows), "num_captions": len(captions)}
    return FeatureFile(embeddings, captions, {**features.meta, **counts})
