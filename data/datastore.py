"""The caption datastore (build_datastore.py; SmallCap's retrieval): a directory of

    index.faiss        a faiss index of the captions' L2-normalized CLIP text embeddings (inner product = cosine)
    captions.parquet   one column, caption: row i is the caption of index id i
    meta.json          format and version, the CLIP as image extraction records it (`encoder`), the normalization,
                       the index type and its parameters, the caption count, the sha256 of both files

written whole into a temporary directory and renamed into place (data/atomic.py), so a datastore that exists is
complete. Opening one verifies both checksums and the count: a damaged or foreign directory is one line.
"""

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.atomic import atomic_directory, write_json_atomic
from data.errors import InputError, first_line, read_json_input

DATASTORE_FORMAT = "clipcap-plus-caption-datastore"
DATASTORE_VERSION = 1
INDEX_FILE = "index.faiss"
CAPTIONS_FILE = "captions.parquet"
META_FILE = "meta.json"
INDEX_TYPES = ("flat", "ivfpq")
NORMALIZATION = "l2"  # every text embedding has unit length: inner product is cosine
PQ_BITS = 8  # bits per product-quantizer code: 256 centroids per sub-vector, faiss's usual choice


@dataclass(frozen=True)
class IndexParams:
    """How the index is built: `flat` (exact) or `ivfpq` (nlist lists, pq_m sub-quantizers of PQ_BITS bits, trained
    on train_sample random rows, nprobe lists searched)."""

    index_type: str
    nlist: int
    pq_m: int
    train_sample: int
    nprobe: int
    seed: int

    def to_meta(self) -> dict:
        """What meta.json records: the parameters that apply to this index type."""
        if self.index_type == "flat":
            return {"index_type": "flat"}
        return {"index_type": "ivfpq", "nlist": self.nlist, "pq_m": self.pq_m, "pq_bits": PQ_BITS,
                "train_sample": self.train_sample, "nprobe": self.nprobe}  # fmt: skip


def check_index_params(params: IndexParams, count: int, dim: int) -> None:
    """Refuse, before any embedding, an ivfpq index these captions cannot train (one line naming the flag)."""
    if params.index_type not in INDEX_TYPES:
        raise InputError(f"--index_type {params.index_type}: choose from {', '.join(INDEX_TYPES)}")
    if params.index_type == "flat":
        return
    if dim % params.pq_m:
        raise InputError(f"--pq_m {params.pq_m}: must divide the CLIP's embedding width {dim}")
    sample = min(params.train_sample, count)
    needed = max(params.nlist, 2**PQ_BITS)
    if sample < needed:
        raise InputError(
            f"--index_type ivfpq: trains on {sample} captions (--train_sample {params.train_sample}, {count} captions), "
            f"needs at least {needed} (--nlist {params.nlist}, {2**PQ_BITS} PQ centroids); use --index_type flat"
        )


def build_index(embeddings: np.ndarray, params: IndexParams) -> faiss.Index:
    """A faiss inner-product index over (N, D) float32 unit rows, trained (ivfpq) on a seeded random sample."""
    dim = embeddings.shape[1]
    if params.index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, params.nlist, params.pq_m, PQ_BITS, faiss.METRIC_INNER_PRODUCT)
        rows = np.random.default_rng(params.seed).permutation(len(embeddings))[: params.train_sample]
        index.train(np.ascontiguousarray(embeddings[np.sort(rows)]))
        index.nprobe = params.nprobe
    index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    return index


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_datastore(
    directory: str | os.PathLike, embeddings: np.ndarray, captions: list[str], params: IndexParams, meta: dict
) -> dict:
    """Build the index of (N, D) unit rows `embeddings` (row i embeds captions[i]) and write the datastore
    directory atomically; `meta` holds the encoder and the source. Returns the meta.json written."""
    index = build_index(embeddings, params)
    with atomic_directory(directory) as building:
        faiss.write_index(index, str(building / INDEX_FILE))
        pq.write_table(pa.table({"caption": pa.array(captions, type=pa.string())}), building / CAPTIONS_FILE)
        written = {
            "format": DATASTORE_FORMAT,
            "version": DATASTORE_VERSION,
            **meta,
            "normalization": NORMALIZATION,
            "embedding_dim": int(embeddings.shape[1]),
            **params.to_meta(),
            "count": len(captions),
            "index_sha256": _file_sha256(building / INDEX_FILE),
            "captions_sha256": _file_sha256(building / CAPTIONS_FILE),
        }
        write_json_atomic(building / META_FILE, written)
    return written


@dataclass
class Datastore:
    """An opened datastore: its index (on every GPU where faiss-gpu has one), captions and meta."""

    directory: Path
    index: Any  # faiss.Index
    captions: list[str]
    meta: dict

    @property
    def checksum(self) -> str:
        """Names the datastore's content (from its files' checksums): a retrieval cache key, a checkpoint record."""
        both = f"{self.meta['index_sha256']}\0{self.meta['captions_sha256']}"
        return hashlib.sha256(both.encode()).hexdigest()[:16]

    @property
    def encoder(self) -> dict:
        """The CLIP's spec as image extraction records it (check_same_encoder compares it with a feature file's)."""
        return self.meta["encoder"]

    def __len__(self) -> int:
        return len(self.captions)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, k) inner products and (B, k) caption ids of (B, D) float32 unit queries, best first (-1: none)."""
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def _refuse(directory: Path, reason: str) -> None:
    raise InputError(f"{directory}: not a usable caption datastore: {reason}")


def read_datastore(directory: str | os.PathLike) -> Datastore:
    """Open a datastore, its files held to meta.json's checksums and count; anything else is one InputError line."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        _refuse(directory, f"no {META_FILE} (not a build_datastore.py output)")
    meta = read_json_input(meta_path, "datastore meta")
    if not isinstance(meta, dict) or meta.get("format") != DATASTORE_FORMAT:
        _refuse(directory, f"{META_FILE} is not a caption datastore's")
    if meta.get("version") != DATASTORE_VERSION:
        _refuse(directory, f"{META_FILE} names version {meta.get('version')!r}, this code reads {DATASTORE_VERSION}")
    fields = {"encoder": dict, "count": int, "index_sha256": str, "captions_sha256": str, "index_type": str}
    missing = [name for name, kind in fields.items() if not isinstance(meta.get(name), kind)]
    if missing:
        _refuse(directory, f"{META_FILE} lacks {', '.join(missing)}")
    for name, sha_field in ((INDEX_FILE, "index_sha256"), (CAPTIONS_FILE, "captions_sha256")):
        path = directory / name
        try:
            digest = _file_sha256(path)
        except FileNotFoundError:
            _refuse(directory, f"{name} is missing")
        except OSError as error:
            raise InputError(f"{path}: cannot be read ({error.strerror or error})") from None
        if digest != meta[sha_field]:
            _refuse(directory, f"{name} does not match its checksum in {META_FILE} (damaged or replaced)")
    try:
        captions = pq.read_table(directory / CAPTIONS_FILE, columns=["caption"]).column("caption").to_pylist()
        index = faiss.read_index(str(directory / INDEX_FILE))
    except (OSError, pa.ArrowException, RuntimeError, KeyError) as error:  # faiss raises RuntimeError
        _refuse(directory, f"its files do not parse ({first_line(error)})")
    if not len(captions) == index.ntotal == meta["count"]:
        _refuse(directory, f"{META_FILE} counts {meta['count']}, the index holds {index.ntotal}, "
                f"the captions {len(captions)}")  # fmt: skip
    if meta["index_type"] == "ivfpq":
        faiss.extract_index_ivf(index).nprobe = int(meta.get("nprobe", 1))
    if faiss.get_num_gpus() > 0:  # faiss-gpu installed and a GPU seen: search there
        index = faiss.index_cpu_to_all_gpus(index)
    return Datastore(directory, index, captions, meta)
