"""Partial extraction results on disk, for `--resume` and for merging the shares of torchrun processes.

Encoded images are saved in chunks (one small file per few thousand images, so saving stays linear in
the work done) in `<output_file>.partial/`, beside a fingerprint of the settings that produced them.
Every chunk is written atomically: a killed run loses at most the chunk it was filling.
"""

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.atomic import remove_stale_temporaries, torch_save_atomic, write_json_atomic
from data.errors import InputError

FINGERPRINT_FILE = "fingerprint.json"
GATHER_ROWS = 64  # rows copied at a time out of a chunk: 10 MB of ViT-B/32 tokens in float32


@dataclass
class Chunk:
    """Results for some images, by their index in the annotation file's image list."""

    indices: list[int] = field(default_factory=list)  # encoded images, one per feature row
    features: list[torch.Tensor] = field(default_factory=list)  # (b, D) or (b, T, D) blocks, rows in `indices` order
    failures: list[tuple[int, str]] = field(default_factory=list)  # (index, reason)

    @property
    def size(self) -> int:
        return len(self.indices) + len(self.failures)

    def add(self, indices: list[int], features: torch.Tensor, failures: list[tuple[int, str]]) -> None:
        self.indices.extend(indices)
        self.features.append(features)
        self.failures.extend(failures)


def _read_chunk(path: Path) -> dict:
    """A chunk file with its features memory-mapped: only the pages of the rows used are read."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if len(payload["indices"]) != len(payload["features"]):
            raise ValueError(f"{len(payload['indices'])} indices for {len(payload['features'])} feature rows")
        payload["failures"] = [(int(index), str(reason)) for index, reason in payload["failures"]]
    except Exception as error:  # torch raises many types for a corrupt file
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise InputError(f"{path}: unreadable partial result ({reason}); delete it to re-encode its images") from None
    return payload


@dataclass
class SavedResults:
    """The partial store's results by image index, the feature rows still in their chunk files."""

    rows: dict[int, tuple[Path, int]]  # encoded image -> (chunk file, position of its row there)
    failed: dict[int, str]  # image with no row -> why
    row_shape: tuple[int, ...] | None  # one row's shape, (D,) or (T, D); None when no image was encoded

    def gather(self, indices: Sequence[int], dtype: type = np.float32) -> np.ndarray:
        """The rows of `indices`, in that order, as one (len(indices), *row_shape) array of `dtype` (cast as
        numpy's astype casts); each chunk file is mapped once and only the rows asked for are read."""
        out = np.empty((len(indices), *self.row_shape), dtype=dtype)
        by_chunk: dict[Path, tuple[list[int], list[int]]] = {}
        for position, index in enumerate(indices):
            path, row = self.rows[index]
            targets, sources = by_chunk.setdefault(path, ([], []))
            targets.append(position)
            sources.append(row)
        for path, (targets, sources) in by_chunk.items():
            _copy_rows(out, targets, _read_chunk(path)["features"].numpy(), sources)
        return out


def _copy_rows(out: np.ndarray, targets: list[int], features: np.ndarray, sources: list[int]) -> None:
    """out[targets] = features[sources], a few rows at a time: indexing a chunk's rows at once would copy
    them all in float32 first. Returning unmaps the chunk before the next one is opened."""
    for start in range(0, len(targets), GATHER_ROWS):
        block = slice(start, start + GATHER_ROWS)
        out[targets[block]] = features[sources[block]]


def fingerprint(
    encoder_spec: dict, precision: str, captions_file: str, split: str | None, images_dir: str, file_paths: list[str]
) -> dict:
    """What must not change between an interrupted run and its resumption."""
    paths_digest = hashlib.sha256("\n".join(file_paths).encode("utf-8")).hexdigest()
    return {
        "encoder": encoder_spec,
        "precision": precision,  # bf16 features resumed in fp32 would not equal either run
        "captions_file": str(Path(captions_file).resolve()),
        "split": split,
        "images_dir": str(Path(images_dir).resolve()),
        "num_images": len(file_paths),
        "image_paths_sha256": paths_digest,
    }


class PartialStore:
    """The `<output_file>.partial/` directory: a fingerprint and chunk files named by their first index."""

    def __init__(self, output_file: str | os.PathLike, settings: dict[str, Any]):
        self.directory = Path(f"{output_file}.partial")
        # A JSON round trip, so the comparison with the stored copy sees lists, not tuples.
        self.settings = json.loads(json.dumps(settings))
        # A fresh run deletes the store's content: through a link, that would be someone else's directory.
        if self.directory.is_symlink() or (self.directory.exists() and not self.directory.is_dir()):
            raise InputError(
                f"{self.directory}: is a symbolic link or not a directory; the partial results of an extraction "
                "must be a plain directory (move this one away)"
            )

    def check(self) -> None:
        """Refuse to resume from results made with other settings (or from no fingerprint at all)."""
        if not self.directory.exists():
            return
        path = self.directory / FINGERPRINT_FILE
        try:
            stored = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            stored = None
        if stored != self.settings:
            changed = sorted(
                k for k in self.settings if not isinstance(stored, dict) or stored.get(k) != self.settings[k]
            )
            raise InputError(
                f"{self.directory}: partial results were made with other settings ({', '.join(changed) or 'unknown'}); "
                "delete the directory or run without --resume"
            )

    def start(self, fresh: bool) -> None:
        """Create the directory with its fingerprint; `fresh` discards earlier partial results first."""
        if fresh and self.directory.exists():
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.directory, "*")  # chunks a killed run was writing; the directory is ours
        write_json_atomic(self.directory / FINGERPRINT_FILE, self.settings)

    def save(self, chunk: Chunk) -> None:
        """Write one chunk atomically; its first index names it (each image is done once per run chain)."""
        first = min([*chunk.indices, *(index for index, _ in chunk.failures)])
        features = torch.cat(chunk.features) if chunk.features else torch.empty(0)
        payload = {"indices": chunk.indices, "features": features, "failures": [list(f) for f in chunk.failures]}
        torch_save_atomic(payload, self.directory / f"chunk-{first:09d}.pt")

    def saved(self) -> SavedResults:
        """What the chunk files hold, their features left on disk: each encoded image's place, each failure."""
        rows: dict[int, tuple[Path, int]] = {}
        failed: dict[int, str] = {}
        row_shape = None
        for path in sorted(self.directory.glob("chunk-*.pt")):
            payload = _read_chunk(path)
            indices, features = payload["indices"], payload["features"]
            rows.update((int(index), (path, position)) for position, index in enumerate(indices))
            failed.update(payload["failures"])
            if indices:
                row_shape = tuple(features.shape[1:])
        return SavedResults(rows, {index: reason for index, reason in failed.items() if index not in rows}, row_shape)

    def remove(self) -> None:
        """Delete the partial results once the merged file is written."""
        shutil.rmtree(self.directory, ignore_errors=True)
