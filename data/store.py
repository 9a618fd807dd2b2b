"""The sharded feature store: a directory for data sets too large for one pickle in memory.

    meta.json                  the pickle's meta, plus the store's format, the row shape ([D] or [T, D])
                               and every shard: its files, row and caption counts, the sha256 of each file
    shard-00000.npy            (rows, D) or (rows, T, D) embeddings, fp32 or fp16, read memory-mapped
    shard-00000.parquet        one row per caption: image_id, caption, row (within the shard)

Every file is written atomically and meta.json last, so a store that lists a shard has it whole;
reading checks each listed file's presence, header, shape and size, never its content at open (a run must
not read the embeddings it memory-maps): rows holding NaN or infinity are refused where they are read.
The checksums in meta.json give the store's data keys instead.
`read_features` is the one reader of features, pickle or store.
"""

import hashlib
import io
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from data.atomic import atomic_write, write_json_atomic
from data.errors import InputError, read_json_input
from data.features import (
    FEATURES_KEY,
    FeatureFile,
    check_pickle_fits,
    first_rows,
    nonfinite_rows,
    read_feature_file,
    refuse_nonfinite_rows,
    write_feature_file,
)

STORE_FORMAT = "clipcap-plus-feature-store"
STORE_VERSION = 1
META_FILE = "meta.json"
FEATURE_DTYPES = {"fp32": np.float32, "fp16": np.float16}
# Embedding bytes per shard, whatever a row holds: 13,981 ViT-B/32 token matrices (50 x 768) in fp16,
# 524,288 rows of 512 fp32 features. An extraction holds one shard in memory while it writes it.
SHARD_BYTES = 1024**3
# Float32 bytes a pass over many rows (a check, a copy) takes at a time: it holds one block's temporaries.
BLOCK_BYTES = 64 * 1024**2
SHARD_NAME = r"shard-\d{5,}"  # what shard_name writes; meta.json may name nothing else


def default_feature_dtype(row_shape: Sequence[int]) -> str:
    """fp32 for one vector per image; fp16 for token matrices, T times larger (50 for ViT-B/32)."""
    return "fp16" if len(row_shape) > 1 else "fp32"


def default_rows_per_shard(row_shape: Sequence[int], feature_dtype: str) -> int:
    """Rows in about SHARD_BYTES of embeddings (at least one): a shard is gathered in memory to be written."""
    row_bytes = math.prod(row_shape) * np.dtype(FEATURE_DTYPES[feature_dtype]).itemsize
    return max(1, SHARD_BYTES // row_bytes)


def is_store(path: str | os.PathLike) -> bool:
    """Whether `path` names a store (a directory) rather than a feature pickle."""
    return Path(path).is_dir()


def shard_name(number: int) -> str:
    """The stem of shard `number`'s files."""
    return f"shard-{number:05d}"


def _row_blocks(num_rows: int, row_shape: Sequence[int]) -> Iterator[slice]:
    """Consecutive rows in blocks of about BLOCK_BYTES as float32 (at least one row each)."""
    per_block = max(1, BLOCK_BYTES // (4 * math.prod(row_shape)))
    for start in range(0, num_rows, per_block):
        yield slice(start, min(start + per_block, num_rows))


def check_storable(where: Path, embeddings: np.ndarray, feature_dtype: str, image_of_row: dict[int, Any]) -> None:
    """Refuse rows that are not finite once stored as `feature_dtype` (fp16 ends at 65504: beyond is infinity),
    naming `where`, the rows and the first one's image; cast and checked a block of rows at a time."""
    dtype = FEATURE_DTYPES[feature_dtype]
    with np.errstate(over="ignore"):  # the overflow is what this reports
        bad = [
            block.start + row
            for block in _row_blocks(len(embeddings), embeddings.shape[1:])
            for row in nonfinite_rows(torch.from_numpy(np.asarray(embeddings[block], dtype=dtype)))
        ]
    if bad:
        advice = "; write the store in fp32 (--feature_dtype fp32)" if feature_dtype != "fp32" else ""
        raise InputError(
            f"{where}: {len(bad)} row(s) overflow {feature_dtype}, whose largest value is {np.finfo(dtype).max:g} "
            f"(rows {first_rows(bad)}; the first is image {image_of_row.get(bad[0], '?')!r}){advice}"
        )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _id_type(image_ids: Sequence[Any], where: str) -> pa.DataType:
    # One parquet column holds one type: COCO's ids are numbers, a webdataset's keys are text.
    if all(isinstance(value, int) and not isinstance(value, bool) for value in image_ids):
        return pa.int64()
    if all(isinstance(value, str) for value in image_ids):
        return pa.string()
    raise InputError(f"{where}: image ids mix numbers and text (or hold other types); a store keeps one type")


class _HashingWriter:
    """A write-only file that hashes what passes through it: np.save writes to a non-file object in pieces
    of at most 16 MiB, so a shard's bytes are never held whole beside its array."""

    def __init__(self, handle: Any):
        self.handle, self.digest = handle, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.handle.write(data)


def write_shard(
    directory: str | os.PathLike,
    name: str,
    embeddings: np.ndarray,
    captions: Sequence[tuple[Any, str, int]],
    feature_dtype: str = "fp32",
    extra: dict | None = None,
) -> dict:
    """Write one shard (embeddings (n, D) or (n, T, D), captions as (image_id, text, row in shard)) atomically;
    returns its record for meta.json (with `extra`, e.g. the source shard and skipped samples)."""
    directory = Path(directory)
    with np.errstate(over="ignore"):  # an overflow is refused next, in one line
        array = np.ascontiguousarray(embeddings, dtype=FEATURE_DTYPES[feature_dtype])
    ids = [image_id for image_id, _, _ in captions]
    check_storable(directory / f"{name}.npy", array, feature_dtype, {row: image_id for image_id, _, row in captions})
    table = pa.table(
        {
            "image_id": pa.array(ids, type=_id_type(ids, str(directory / name))),
            "caption": pa.array([text for _, text, _ in captions], type=pa.string()),
            "row": pa.array([row for _, _, row in captions], type=pa.int64()),
        }
    )
    buffer = io.BytesIO()  # the captions are small beside the embeddings: they are hashed whole
    pq.write_table(table, buffer)
    parquet = buffer.getvalue()
    with atomic_write(directory / f"{name}.npy") as handle:
        npy = _HashingWriter(handle)
        np.save(npy, array, allow_pickle=False)
    with atomic_write(directory / f"{name}.parquet") as handle:
        handle.write(parquet)
    record = {
        "name": name,
        "rows": int(array.shape[0]),
        "captions": len(captions),
        "embeddings_sha256": npy.digest.hexdigest(),
        "captions_sha256": _sha256(parquet),
    }
    return {**record, **(extra or {})}


def write_store_meta(
    directory: str | os.PathLike, meta: dict, shards: list[dict], row_shape: Sequence[int], dtype: str
) -> None:
    """meta.json, written last: from then on the store is whole. `row_shape` is one image's: (D,) or (T, D)."""
    store = {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        "feature_dtype": dtype,
        "shards": shards,
    }
    counts = {
        "feature_dim": int(row_shape[-1]),
        "row_shape": [int(size) for size in row_shape],
        "num_images": sum(shard["rows"] for shard in shards),
        "num_captions": sum(shard["captions"] for shard in shards),
    }
    write_json_atomic(Path(directory) / META_FILE, {**meta, **counts, "store": store})


ShardRows = Callable[[int, int], tuple[np.ndarray, list[tuple[Any, str, int]]]]


def write_store(
    directory: str | os.PathLike,
    meta: dict,
    num_rows: int,
    row_shape: Sequence[int],
    feature_dtype: str,
    shard_rows: ShardRows,
    rows_per_shard: int | None = None,
) -> None:
    """Write a store of `num_rows` rows shard by shard, then meta.json: `shard_rows(start, stop)` gives the
    embeddings of rows start..stop-1 and their captions as (image_id, text, row in shard), and is asked for
    one shard at a time. Shards hold `rows_per_shard` rows (default: `default_rows_per_shard`)."""
    per_shard = rows_per_shard or default_rows_per_shard(row_shape, feature_dtype)
    shards = []
    for number, start in enumerate(range(0, max(num_rows, 1), per_shard)):
        stop = min(start + per_shard, num_rows)
        # Unpacked straight into write_shard, never named here: a shard's rows are freed before the next
        # shard's are gathered, so no more than one shard is in memory.
        shards.append(write_shard(directory, shard_name(number), *shard_rows(start, stop), feature_dtype))
    write_store_meta(directory, meta, shards, row_shape, feature_dtype)


def _feature_file_rows(features: FeatureFile) -> ShardRows:
    """`write_store`'s rows of a FeatureFile in memory: captions grouped by row, in file order within a row."""
    embeddings = features.embeddings.detach().float().cpu().contiguous().numpy()
    rows = np.array([caption[FEATURES_KEY] for caption in features.captions], dtype=np.int64)
    order = np.argsort(rows, kind="stable")

    def shard_rows(start: int, stop: int) -> tuple[np.ndarray, list[tuple[Any, str, int]]]:
        chosen = order[(rows[order] >= start) & (rows[order] < stop)]
        captions = [
            (features.captions[i]["image_id"], features.captions[i]["caption"], int(rows[i]) - start) for i in chosen
        ]
        return embeddings[start:stop], captions

    return shard_rows


class ShardedEmbeddings:
    """(N, D) or (N, T, D) feature rows over memory-mapped .npy shards: indexing reads only the rows asked for and
    gives float32 tensors, as a pickle's tensor would. Pickled (to DataLoader workers) as paths."""

    def __init__(self, paths: list[Path], digest: str):
        self.paths, self.digest = paths, digest
        self._open()

    def _open(self) -> None:
        self.arrays = [np.load(path, mmap_mode="r", allow_pickle=False) for path in self.paths]
        self.starts = np.cumsum([0] + [len(array) for array in self.arrays])  # (shards + 1,)

    def __getstate__(self) -> dict:
        return {"paths": self.paths, "digest": self.digest}  # never the mapped pages

    def __setstate__(self, state: dict) -> None:
        self.paths, self.digest = state["paths"], state["digest"]
        self._open()

    @property
    def shape(self) -> torch.Size:
        return torch.Size((int(self.starts[-1]), *self.arrays[0].shape[1:]))

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _locate(self, rows: np.ndarray) -> np.ndarray:
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows outside 0..{len(self) - 1}")
        return np.searchsorted(self.starts, rows, side="right") - 1

    def _check_finite(self, values: np.ndarray, rows: np.ndarray, shards: np.ndarray) -> None:
        """Refuse read rows (store rows `rows`, in `shards`) holding NaN or infinity, naming the first one's shard
        and its rows there: checked as rows are read, since checking at open would read the whole store."""
        bad = nonfinite_rows(torch.from_numpy(values))
        if bad:
            shard = shards[bad[0]]
            in_shard = [int(rows[i] - self.starts[shard]) for i in bad if shards[i] == shard]
            refuse_nonfinite_rows(self.paths[shard], in_shard)

    def __getitem__(self, index: Any) -> torch.Tensor:
        if isinstance(index, slice):
            index = np.arange(len(self))[index]
        rows = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64)
        if rows.ndim == 0:  # one row: (D,) or (T, D)
            shards = self._locate(rows.reshape(1))
            value = np.array(self.arrays[shards[0]][int(rows) - self.starts[shards[0]]], dtype=np.float32)
            self._check_finite(value[None], rows.reshape(1), shards)
            return torch.from_numpy(value)
        shards = self._locate(rows)
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.float32)  # (k, D) or (k, T, D)
        for shard in np.unique(shards):
            mask = shards == shard
            out[mask] = self.arrays[shard][rows[mask] - self.starts[shard]]
        self._check_finite(out, rows, shards)
        return torch.from_numpy(out)

    def numpy(self) -> np.ndarray:
        """Every row as one float32 array (for the converter: this reads the whole store), a block at a time."""
        out = np.empty(self.shape, dtype=np.float32)
        for block in _row_blocks(len(self), self.shape[1:]):
            out[block] = self[block].numpy()
        return out


class CaptionTable(Sequence):
    """A store's captions as columns, not a list of dicts: item i is the dict a pickle's caption
    list holds. `key` names its content (from the shards' checksums), so nothing hashes the texts."""

    def __init__(self, image_ids: pa.ChunkedArray, texts: pa.ChunkedArray, rows: np.ndarray, key: str):
        self.image_ids, self.texts, self.rows, self.key = image_ids, texts, rows, key

    def __len__(self) -> int:
        return len(self.rows)

    def _item(self, index: int) -> dict:
        return {
            "image_id": self.image_ids[index].as_py(),
            "caption": self.texts[index].as_py(),
            FEATURES_KEY: int(self.rows[index]),
        }

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self._item(i) for i in range(len(self))[index]]
        return self._item(index)

    def __iter__(self) -> Iterator[dict]:
        for image_id, text, row in zip(self.image_ids.to_pylist(), self.texts.to_pylist(), self.rows.tolist()):
            yield {"image_id": image_id, "caption": text, FEATURES_KEY: row}

    def text_list(self) -> list[str]:
        """The caption texts, in order."""
        return self.texts.to_pylist()

    def char_lengths(self) -> np.ndarray:
        """Each caption's length in characters (code points, as Python's len)."""
        return pc.utf8_length(self.texts).to_numpy()

    def select(self, mask: np.ndarray, why: str) -> "CaptionTable":
        """The captions where `mask` holds; `why` (the rule that made the mask) goes into the key."""
        keep = pa.array(mask)
        key = _sha256(f"{self.key}\0{why}".encode())[:16]
        return CaptionTable(self.image_ids.filter(keep), self.texts.filter(keep), self.rows[mask], key)


def _refuse(directory: Path, reason: str) -> None:
    raise InputError(f"{directory}: not a usable feature store: {reason}")


def _read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """A .npy file's shape, dtype and data offset, read from its header alone (nothing is allocated for its data)."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        if version not in ((1, 0), (2, 0)):  # what np.save writes for a float array
            raise ValueError(f"version {version[0]}.{version[1]}")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(handle)
        return shape, dtype, handle.tell()


def _open_shard_embeddings(directory: Path, shard: dict, row_shape: tuple[int, ...], dtype: str) -> np.ndarray:
    path = directory / f"{shard['name']}.npy"
    try:
        shape, stored_dtype, offset = _read_npy_header(path)
    except FileNotFoundError:
        raise InputError(f"{path}: missing; the store's meta.json lists it") from None
    except (OSError, ValueError, EOFError) as error:  # a cut or foreign header does not parse
        raise InputError(f"{path}: truncated or not a .npy file ({error})") from None
    # The header's claims, held to meta.json and the file's size before anything is mapped or read.
    expected = (shard["rows"], *row_shape)
    if shape != expected or stored_dtype != FEATURE_DTYPES[dtype]:
        raise InputError(f"{path}: holds {stored_dtype} {shape}, meta.json says {dtype} {expected}")
    size, data_bytes = os.path.getsize(path), math.prod(shape) * stored_dtype.itemsize
    if size != offset + data_bytes:
        raise InputError(f"{path}: truncated or not a .npy file ({size} bytes, not {offset + data_bytes})")
    # An empty shard (every sample of its source skipped) has no data to map.
    return np.load(path, mmap_mode="r" if shard["rows"] else None, allow_pickle=False)


# The captions' columns and the types write_shard gives them (image ids are numbers or text, see _id_type).
CAPTION_COLUMNS = {"image_id": (pa.int64(), pa.string()), "caption": (pa.string(),), "row": (pa.int64(),)}


def _check_caption_columns(path: Path, shard: dict, captions: pq.ParquetFile) -> None:
    # The footer's claims, held to meta.json and to the columns write_shard writes before a column is read.
    if captions.metadata.num_rows != shard["captions"]:
        raise InputError(f"{path}: holds {captions.metadata.num_rows} captions, meta.json says {shard['captions']}")
    schema = captions.schema_arrow
    for name, types in CAPTION_COLUMNS.items():
        if name not in schema.names:
            raise InputError(f"{path}: has no column {name!r}")
        held = schema.field(name).type
        if held not in types:
            raise InputError(f"{path}: column {name!r} holds {held}, not {' or '.join(map(str, types))}")


def _read_shard_captions(directory: Path, shard: dict) -> pa.Table:
    path = directory / f"{shard['name']}.parquet"
    if not path.is_file():
        raise InputError(f"{path}: missing; the store's meta.json lists it")
    try:
        captions = pq.ParquetFile(path)
        _check_caption_columns(path, shard, captions)
        table = captions.read(columns=list(CAPTION_COLUMNS))
    except (OSError, pa.ArrowException) as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise InputError(f"{path}: truncated or not a captions parquet file ({reason})") from None
    for name in CAPTION_COLUMNS:
        if table.column(name).null_count:
            raise InputError(f"{path}: column {name!r} has {table.column(name).null_count} null value(s)")
    rows = table.column("row").to_numpy()
    if len(rows) and (rows.min() < 0 or rows.max() >= shard["rows"]):
        raise InputError(f"{path}: a caption's row lies outside the shard's {shard['rows']} rows")
    return table


def _check_meta(directory: Path, meta: Any) -> tuple[dict, list[dict]]:
    if not isinstance(meta, dict) or not isinstance(meta.get("store"), dict):
        _refuse(directory, f"{META_FILE} is not a store's meta")
    store = meta["store"]
    if store.get("format") != STORE_FORMAT or store.get("version") != STORE_VERSION:
        _refuse(directory, f"{META_FILE} names format {store.get('format')!r} version {store.get('version')!r}")
    if store.get("feature_dtype") not in FEATURE_DTYPES:
        _refuse(directory, f"feature_dtype {store.get('feature_dtype')!r} is not one of {', '.join(FEATURE_DTYPES)}")
    shards = store.get("shards")
    if not isinstance(shards, list) or not shards:
        _refuse(directory, f"{META_FILE} lists no shards")
    fields = {"name": str, "rows": int, "captions": int, "embeddings_sha256": str, "captions_sha256": str}
    names = set()
    for shard in shards:
        if not isinstance(shard, dict) or any(not _is_a(shard.get(k), t) for k, t in fields.items()):
            _refuse(directory, f"{META_FILE} has a shard entry without {', '.join(fields)}")
        if not re.fullmatch(SHARD_NAME, shard["name"]):  # nor a path, nor another file of the directory
            _refuse(directory, f"{shard['name']!r} is not a shard's name (shard-00000, ...)")
        if shard["name"] in names:  # its rows would be read twice
            _refuse(directory, f"{META_FILE} lists shard {shard['name']} twice")
        names.add(shard["name"])
        if shard["rows"] < 0 or shard["captions"] < 0:
            _refuse(directory, f"shard {shard['name']} has a negative count")
    return store, shards


def _is_a(value: Any, kind: type) -> bool:
    # JSON's true is a Python int too; no count in meta.json is ever a boolean.
    return isinstance(value, kind) and not isinstance(value, bool)


def read_store(directory: str | os.PathLike, verify_checksums: bool = False) -> FeatureFile:
    """Open a store: embeddings memory-mapped, captions as columns. Missing, truncated or mismatched
    files are refused in one line; `verify_checksums` also hashes every file (reads it all)."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        _refuse(directory, f"no {META_FILE} (an extraction that has not finished, or not a store)")
    meta = read_json_input(meta_path, "store meta")
    store, shards = _check_meta(directory, meta)
    feature_dim = meta.get("feature_dim")
    if not _is_a(feature_dim, int) or feature_dim < 1:
        _refuse(directory, f"feature_dim {feature_dim!r} in {META_FILE}")
    row_shape = meta.get("row_shape", [feature_dim])  # stores written before token features record none
    if (
        not isinstance(row_shape, list)
        or len(row_shape) not in (1, 2)
        or any(not _is_a(size, int) or size < 1 for size in row_shape)
    ):
        _refuse(directory, f"row_shape {row_shape!r} in {META_FILE} is not [feature_dim] or [tokens, feature_dim]")
    if verify_checksums:
        _verify_checksums(directory, shards)
    arrays, tables, rows, start = [], [], [], 0
    for shard in shards:
        # The width every reader uses is feature_dim: the shards are held to it first.
        arrays.append(_open_shard_embeddings(directory, shard, (*row_shape[:-1], feature_dim), store["feature_dtype"]))
        table = _read_shard_captions(directory, shard)
        tables.append(table)
        rows.append(table.column("row").to_numpy().astype(np.int64) + start)
        start += shard["rows"]
    if row_shape[-1] != feature_dim:
        _refuse(directory, f"row_shape {row_shape!r} in {META_FILE} does not end in its feature_dim {feature_dim}")
    if start == 0 or not sum(table.num_rows for table in tables):
        _refuse(directory, "it holds no images or no captions")
    # Checked once the shards are: a shard entry that lies is named by its file. Readers pass meta on.
    for count, field in (("num_images", "rows"), ("num_captions", "captions")):
        held = sum(shard[field] for shard in shards)
        if count in meta and meta[count] != held:
            _refuse(directory, f"{META_FILE} says {count} {meta[count]!r}, its shards hold {held}")
    # A shard with no captions (every sample of its source skipped) has no image id type of its own.
    id_types = {table.schema.field("image_id").type for table in tables if table.num_rows}
    tables = [table for table in tables if table.num_rows]
    try:
        if len(id_types) > 1:
            raise pa.ArrowInvalid("image id types differ")
        captions = pa.concat_tables(tables)
    except pa.ArrowInvalid:
        _refuse(directory, "its shards' image ids differ in type (numbers in some, text in others)")
    keep = [shard for shard, array in zip(shards, arrays) if len(array)]  # np.load cannot map an empty file's data
    paths = [directory / f"{shard['name']}.npy" for shard in keep]
    embeddings = ShardedEmbeddings(paths, _digest(shard["embeddings_sha256"] for shard in shards))
    table = CaptionTable(
        captions.column("image_id"),
        captions.column("caption"),
        np.concatenate(rows),
        _digest(shard["captions_sha256"] for shard in shards),
    )
    return FeatureFile(embeddings, table, {key: value for key, value in meta.items() if key != "store"})


def _digest(checksums: Iterator[str]) -> str:
    return _sha256("\n".join(checksums).encode())[:16]


def _verify_checksums(directory: Path, shards: list[dict]) -> None:
    for shard in shards:
        for suffix, field in ((".npy", "embeddings_sha256"), (".parquet", "captions_sha256")):
            path = directory / f"{shard['name']}{suffix}"
            digest = hashlib.sha256()
            try:
                with open(path, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(block)
            except OSError as error:
                raise InputError(f"{path}: cannot be read ({error.strerror or error})") from None
            if digest.hexdigest() != shard[field]:
                raise InputError(f"{path}: its content does not match the checksum in {META_FILE}")


def read_features(path: str | os.PathLike) -> FeatureFile:
    """The one reader of features: a store directory (memory-mapped) or a feature pickle (in memory)."""
    return read_store(path) if is_store(path) else read_feature_file(path)



# The names a store (and an extraction filling one) writes; nothing else is ever deleted from its directory.
_STORE_FILE = re.compile(rf"meta\.json|extraction\.json|{SHARD_NAME}\.(npy|parquet|json)|\..+\.tmp")


def check_store_output(path: str | os.PathLike) -> None:
    """A store goes into a new or empty directory, or replaces an earlier store (or its unfinished
    extraction); a directory holding other files is refused, so replacing cannot delete them."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise InputError(f"{path}: exists and is not a directory; a store is written into a directory")
    others = sorted(entry.name for entry in path.iterdir() if not _STORE_FILE.fullmatch(entry.name)) if path.is_dir() else []
    if others:
        raise InputError(f"{path}: holds files that are not a feature store's ({others[0]}, ...); give a new directory")


def clear_store(path: str | os.PathLike) -> None:
    """Delete an earlier store's files (meta.json first, so it is never whole meanwhile); creates the directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / META_FILE).unlink(missing_ok=True)
    for entry in path.iterdir():
        if _STORE_FILE.fullmatch(entry.name):
            entry.unlink()


def convert_features(
    source: str | os.PathLike,
    target: str | os.PathLike,
    feature_dtype: str | None = None,
    rows_per_shard: int | None = None,
) -> str:
    """Pickle -> store, or store -> pickle, the direction taken from what `source` is; returns it in words."""
    if is_store(source):
        if Path(target).is_dir():
            raise InputError(f"{target}: is a directory; a store converts to a feature pickle file")
        if Path(source).resolve() in Path(target).resolve().parents:
            raise InputError(f"{target}: lies inside the store {source}; write the pickle elsewhere")
        features = read_store(source, verify_checksums=True)  # it is read whole anyway: check every byte
        check_pickle_fits(target, len(features.embeddings), features.row_shape)
        embeddings = torch.from_numpy(features.embeddings.numpy())
        write_feature_file(target, FeatureFile(embeddings, list(features.captions), features.meta))
        return "store -> pickle"
    check_store_output(target)
    features = read_feature_file(source)
    feature_dtype = feature_dtype or default_feature_dtype(features.row_shape)
    meta = {key: value for key, value in features.meta.items() if key != "store"}
    # Checked before clear_store: a row that fp16 cannot hold must not cost the store it would replace.
    image_of_row = {row: image_id for image_id, row in features.image_rows().items()}
    check_storable(Path(target), features.embeddings.numpy(), feature_dtype, image_of_row)
    clear_store(target)
    num_rows = len(features.embeddings)
    write_store(target, meta, num_rows, features.row_shape, feature_dtype, _feature_file_rows(features), rows_per_shard)
    return f"pickle -> store ({feature_dtype})"
