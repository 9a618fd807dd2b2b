"""Retrieval (SmallCap): for each image of a feature file, the ids of the `k` datastore captions whose CLIP text
embeddings are nearest (cosine) to its CLIP image embedding, searched in batches and cached.

The cache is one .npy file per (feature file, datastore, k, exclude_own) under the cache directory train.py
tokenizes into, an (N, k) int64 array of caption ids (row i: image row i; -1 where the datastore holds fewer
than k captions to give), written atomically and read memory-mapped; a file that does not read back as such an
array is computed again and replaced."""

import hashlib
import os
from pathlib import Path

import numpy as np
import torch.nn.functional as F
from tqdm import tqdm

from data.atomic import atomic_write
from data.captions import caption_rows, caption_texts, captions_fingerprint, default_cache_dir
from data.datastore import Datastore
from data.errors import InputError
from data.features import FeatureFile, check_same_encoder

CACHE_SUBDIR = "retrieval"
CACHE_FORMAT = 1  # bump when the cached layout changes
DEFAULT_K = 4  # SmallCap's
SEARCH_BATCH = 1024  # images per faiss search


def query_embeddings(features: FeatureFile, source: str) -> object:
    """The rows to search with: a pooled file's own (N, D) CLIP image embeddings."""
    if features.token_count is not None:
        raise InputError(
            f"{source}: retrieval needs one pooled CLIP image embedding per image; this feature file holds patch tokens "
            "(extract an image_embeds file of the same images)"
        )
    return features.embeddings


def own_captions(features: FeatureFile) -> list[set[str]]:
    """Each image row's caption texts, stripped as the datastore stores them."""
    owned: list[set[str]] = [set() for _ in range(len(features.embeddings))]
    for row, text in zip(caption_rows(features.captions).tolist(), caption_texts(features.captions)):
        owned[row].add(text.strip())
    return owned


def cache_path(cache_dir: str | os.PathLike, features: FeatureFile, datastore: Datastore, k: int,
               exclude_own: bool) -> Path:  # fmt: skip
    """Where the retrieval of `features` from `datastore` is cached: keyed by both contents, k and exclude_own."""
    digest = hashlib.sha256(f"{features.embeddings_digest()}\0{captions_fingerprint(features.captions)}".encode())
    own = "exclude-own" if exclude_own else "all"
    return Path(cache_dir) / CACHE_SUBDIR / f"v{CACHE_FORMAT}-{digest.hexdigest()[:16]}-{datastore.checksum}-k{k}-{own}.npy"


def _read_cache(path: Path, shape: tuple[int, int], count: int) -> np.ndarray | None:
    """The cached ids memory-mapped, or None when absent or not an (N, k) int64 array of ids in -1..count-1."""
    if not path.is_file():
        return None
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):  # torn or foreign: computed again
        return None
    if ids.dtype != np.int64 or ids.shape != shape or (ids.size and (ids.min() < -1 or ids.max() >= count)):
        return None
    return ids


def search_captions(query: np.ndarray, datastore: Datastore, k: int, owned: list[set[str]] | None) -> np.ndarray:
    """(B, k) caption ids for (B, D) unit queries; with `owned` (each query's own captions) those are skipped:
    k + the most any query owns are searched, then filtered, as SmallCap does. -1 fills what is missing."""
    extra = max((len(texts) for texts in owned), default=0) if owned else 0
    _, hits = datastore.search(query, min(k + extra, len(datastore)))  # (B, k + extra)
    out = np.full((len(query), k), -1, dtype=np.int64)
    for row, candidates in enumerate(hits):
        kept = [int(c) for c in candidates if c >= 0 and not (owned and datastore.captions[c] in owned[row])][:k]
        out[row, : len(kept)] = kept
    return out


def retrieve_captions(
    features: FeatureFile,
    datastore: Datastore,
    k: int = DEFAULT_K,
    exclude_own: bool = False,
    cache_dir: str | os.PathLike | None = None,
    source: str = "--features",
) -> np.ndarray:
    """(N, k) int64 caption ids for every image row of `features`, memory-mapped from the cache under `cache_dir`
    (default: default_cache_dir()), computed and cached first when it holds none. `exclude_own` (training) leaves out a caption equal to one of the image's own. The datastore must come
    from the features' CLIP: one InputError line otherwise, naming `source`."""
    if k < 1:
        raise InputError(f"--retrieval_k {k}: must be at least 1")
    query = query_embeddings(features, source)  # first: a patch-token file's encoder differs by its feature type
    check_same_encoder(features, source, datastore.encoder, f"the datastore {datastore.directory}")
    shape = (len(query), k)
    path = cache_path(cache_dir or default_cache_dir(), features, datastore, k, exclude_own)
    if (cached := _read_cache(path, shape, len(datastore))) is not None:
        return cached
    owned = own_captions(features) if exclude_own else None
    ids = np.empty(shape, dtype=np.int64)
    for start in tqdm(range(0, len(query), SEARCH_BATCH), desc="retrieving", unit="batch", dynamic_ncols=True):
        stop = min(start + SEARCH_BATCH, len(query))
        batch = F.normalize(query[start:stop].float(), dim=-1).numpy()  # (B, D) unit rows: inner product = cosine
        ids[start:stop] = search_captions(batch, datastore, k, owned[start:stop] if owned else None)
    with atomic_write(path) as handle:
        np.save(handle, ids, allow_pickle=False)
    return np.load(path, mmap_mode="r", allow_pickle=False)
