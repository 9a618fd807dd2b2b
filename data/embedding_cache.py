"""Cached caption embeddings of a frozen text tower (Stage 0): one file per (model, caption texts) key,
in the cache directory train.py uses for tokenized captions, read back with torch.load(weights_only)."""

import hashlib
import os
from pathlib import Path

import torch

from data.atomic import torch_save_atomic

CACHE_SUBDIR = "text_embeddings"
CACHE_FORMAT = 1  # bump when the cached layout changes


def texts_fingerprint(texts: list[str]) -> str:
    """A hash of the texts in order (a NUL between them, so ["ab", "c"] and ["a", "bc"] differ)."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def cache_path(cache_dir: str | os.PathLike, model_key: str, texts: list[str]) -> Path:
    """Where the embeddings of `texts` by the model `model_key` names are cached."""
    return Path(cache_dir) / CACHE_SUBDIR / f"v{CACHE_FORMAT}-{model_key}-{texts_fingerprint(texts)}.pt"


def read_cached_embeddings(path: Path, num_texts: int, width: int) -> torch.Tensor | None:
    """The cached (num_texts, width) float32 embeddings, or None when absent, unreadable or not that shape."""
    if not path.is_file():
        return None
    try:
        embeddings = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a torn or foreign file: recompute and replace it
        return None
    fits = isinstance(embeddings, torch.Tensor) and embeddings.shape == (num_texts, width)
    return embeddings.float() if fits and bool(embeddings.isfinite().all()) else None


def write_cached_embeddings(path: Path, embeddings: torch.Tensor) -> None:
    """Store the embeddings atomically, so a killed run never leaves half a cache file."""
    torch_save_atomic(embeddings.detach().cpu().float().contiguous(), path)
