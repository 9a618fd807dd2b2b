"""The sharded feature store: exact round trips with the pickle, memory-mapped reading through the one
reader, refusal of half-written or mismatched stores, and train.py giving the same losses on either."""

import json
import pickle
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import convert_features
import predict
import train
from data.captions import captions_fingerprint, drop_long_captions, load_or_tokenize
from data.errors import InputError
from data.features import FeatureFile, read_feature_file, write_feature_file
from data.references import load_references
from data.store import (
    META_FILE,
    CaptionTable,
    ShardedEmbeddings,
    default_rows_per_shard,
    read_features,
    read_store,
    write_shard,
)
from models.lm import load_tokenizer
from tests.test_training import CAPTIONS, read_log, train_args


def sample_features(num_images: int = 7, feature_dim: int = 6, ids: str = "int") -> FeatureFile:
    """Images with one to three captions each (unicode included), rows not in id order."""
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(num_images, feature_dim, generator=generator) * 3
    captions = [
        {
            "image_id": (100 - row) if ids == "int" else f"key{row:03d}",
            "caption": CAPTIONS[(row + k) % len(CAPTIONS)] + (" — é" if k == 2 else ""),
            "clip_embedding": row,
        }
        for row in range(num_images)
        for k in range(1 + row % 3)
    ]
    return FeatureFile(embeddings, captions, {"feature_dim": feature_dim, "encoder": {"family": "clip"}, "split": "x"})


def make_store(tmp_path: Path, features: FeatureFile, *flags: str) -> Path:
    source = tmp_path / "features.pkl"
    write_feature_file(source, features)
    store = tmp_path / "store"
    convert_features.main(convert_features.parse_args([str(source), str(store), "--rows_per_shard", "3", *flags]))
    return store


@pytest.mark.parametrize("ids", ["int", "str"])
def test_pickle_to_store_and_back_is_exact_in_fp32(tmp_path, ids):
    features = sample_features(ids=ids)
    store = make_store(tmp_path, features)
    assert sorted(path.name for path in store.iterdir()) == [
        META_FILE, *(f"shard-0000{n}.{ext}" for n in range(3) for ext in ("npy", "parquet"))
    ]  # fmt: skip
    back = tmp_path / "back.pkl"
    convert_features.main(convert_features.parse_args([str(store), str(back)]))
    loaded = read_feature_file(back)
    assert torch.equal(loaded.embeddings, features.embeddings)
    assert loaded.captions == features.captions
    assert {key: loaded.meta[key] for key in features.meta} == features.meta
    assert (loaded.meta["num_images"], loaded.meta["num_captions"]) == (7, len(features.captions))


def test_fp16_store_is_the_pickle_within_fp16_rounding(tmp_path):
    features = sample_features()
    opened = read_features(make_store(tmp_path, features, "--feature_dtype", "fp16"))
    assert opened.embeddings.arrays[0].dtype == np.float16
    assert torch.equal(opened.embeddings[:], features.embeddings.half().float())
    assert opened.embeddings[:].dtype == torch.float32


def test_the_one_reader_memory_maps_and_indexes_like_a_tensor(tmp_path):
    features = sample_features()
    opened = read_features(make_store(tmp_path, features))
    embeddings = opened.embeddings
    assert isinstance(embeddings, ShardedEmbeddings) and all(isinstance(a, np.memmap) for a in embeddings.arrays)
    assert embeddings.shape == features.embeddings.shape and opened.feature_dim == 6
    assert torch.equal(embeddings[4], features.embeddings[4])  # one row, inside the second shard
    assert torch.equal(embeddings[torch.tensor(5)], features.embeddings[5])
    rows = [6, 0, 3, 3, 2]  # across shards, repeated, out of order
    assert torch.equal(embeddings[rows], features.embeddings[rows])
    assert opened.image_rows() == features.image_rows()
    assert isinstance(opened.captions, CaptionTable) and list(opened.captions) == features.captions
    assert opened.captions[3] == features.captions[3]
    # DataLoader workers get the paths, not the mapped pages; they map the files again.
    assert len(pickle.dumps(embeddings)) < 1000
    assert torch.equal(pickle.loads(pickle.dumps(embeddings))[rows], features.embeddings[rows])


def test_data_keys_come_from_the_checksums_in_meta(tmp_path, tiny_gpt2_dir):
    store = make_store(tmp_path, sample_features())
    meta = json.loads((store / META_FILE).read_text())
    opened = read_store(store)
    assert captions_fingerprint(opened.captions) == opened.captions.key  # the texts are not hashed
    # Edit a checksum in the meta alone: both keys change, though no byte of the shards did.
    meta["store"]["shards"][1]["embeddings_sha256"] = "0" * 64
    meta["store"]["shards"][1]["captions_sha256"] = "0" * 64
    (store / META_FILE).write_text(json.dumps(meta))
    edited = read_store(store)
    assert edited.embeddings_digest() != opened.embeddings_digest()
    assert edited.captions.key != opened.captions.key
    # Dropping long captions is done on the columns, and names itself in the key.
    short, dropped = drop_long_captions(opened, 40)
    assert dropped == sum(len(c["caption"]) > 40 for c in sample_features().captions) > 0
    assert isinstance(short.captions, CaptionTable) and short.captions.key != opened.captions.key
    assert [c["caption"] for c in short.captions] == [c["caption"] for c in sample_features().captions if len(c["caption"]) <= 40]
    tokenizer = load_tokenizer(str(tiny_gpt2_dir))
    from_store = load_or_tokenize(short.captions, tokenizer, tmp_path / "cache")
    from_list = load_or_tokenize(list(short.captions), tokenizer, tmp_path / "cache")
    assert torch.equal(from_store.tokens, from_list.tokens) and torch.equal(from_store.offsets, from_list.offsets)
    again = load_or_tokenize(short.captions, tokenizer, tmp_path / "cache")
    mapped = Path("/proc/self/maps").read_text()
    assert f"{again.key}.tokens.npy" in mapped and f"{again.key}.offsets.npy" in mapped  # mapped, not read


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_meta(store: Path, change) -> None:
    meta = json.loads((store / META_FILE).read_text())
    change(meta)
    (store / META_FILE).write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda s: (s / "shard-00001.npy").unlink(), "shard-00001.npy: missing"),
        (lambda s: (s / "shard-00002.parquet").unlink(), "shard-00002.parquet: missing"),
        (lambda s: _truncate(s / "shard-00001.npy"), "shard-00001.npy: truncated"),
        (lambda s: _truncate(s / "shard-00000.parquet"), "shard-00000.parquet: truncated"),
        (lambda s: (s / META_FILE).unlink(), "no meta.json"),
        (lambda s: _edit_meta(s, lambda m: m["store"]["shards"][1].update(rows=4)), "shard-00001.npy: holds"),
        (lambda s: _edit_meta(s, lambda m: m["store"]["shards"][0].update(captions=1)), "shard-00000.parquet: holds"),
        (lambda s: _edit_meta(s, lambda m: m.update(feature_dim=5)), "shard-00000.npy: holds"),
        (lambda s: _edit_meta(s, lambda m: m["store"].update(feature_dtype="fp16")), "shard-00000.npy: holds"),
        (lambda s: _edit_meta(s, lambda m: m["store"]["shards"][0].update(name="../x")), "'../x' is not a shard's name"),
        (lambda s: _edit_meta(s, lambda m: m["store"]["shards"][0].update(name="/etc/x")), "'/etc/x' is not a shard's name"),
        (lambda s: _edit_meta(s, lambda m: m["store"]["shards"][0].update(name="shard-00009")), "shard-00009.npy: missing"),
        (lambda s: _edit_meta(s, lambda m: m["store"]["shards"][1].update(rows=10**12)), "shard-00001.npy: "),
        (lambda s: _edit_meta(s, lambda m: m["store"].update(shards={"name": "shard-00000"})), "lists no shards"),
        (lambda s: _edit_meta(s, lambda m: m.update(store=[1])), "meta.json is not a store's meta"),
        (lambda s: (s / META_FILE).write_text("{"), "not valid JSON"),
        (lambda s: (s / META_FILE).write_text("[1, 2]"), "meta.json is not a store's meta"),
        (lambda s: (s / META_FILE).write_bytes(b"\xff\xfe"), "meta.json: not valid JSON"),
        (lambda s: _cut(s / "shard-00001.npy", 20), "shard-00001.npy: truncated"),  # inside the header
        (lambda s: _npy_header(s / "shard-00001.npy", (10**12, 6)), "shard-00001.npy: "),  # a huge claim, mapped lazily
        (lambda s: np.save(s / "shard-00001.npy", np.zeros((3, 6), ">f4")), "shard-00001.npy: holds >f4"),
        (lambda s: np.save(s / "shard-00001.npy", np.full((3, 6), None), allow_pickle=True), "shard-00001.npy: "),
        (lambda s: (s / "shard-00000.parquet").write_bytes(b""), "shard-00000.parquet: truncated"),
        (lambda s: _edit_captions(s, "row", pa.array([-1, 0, 1, 1, 2, 2], pa.int64())), "row lies outside"),
        (lambda s: _edit_captions(s, "caption", pa.array(range(6))), "shard-00000.parquet: column 'caption'"),
    ],
)
def test_damaged_or_mismatched_stores_are_refused_in_one_line(tmp_path, damage, message):
    """Cases that were refused before the adversarial pass (some messages have become clearer since)."""
    store = make_store(tmp_path, sample_features())
    damage(store)
    with pytest.raises(InputError, match=message.replace(".", r"\.").replace("(", r"\(")) as caught:
        read_features(store)
    assert "\n" not in str(caught.value)


def _cut(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def _npy_header(path: Path, shape: tuple[int, ...], dtype: str = "<f4") -> None:
    """Replace a .npy file by a header claiming `shape` and a few bytes of data."""
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": dtype, "fortran_order": False, "shape": shape})
        handle.write(bytes(24))


def _edit_captions(store: Path, column: str, values: pa.Array | None, shard: str = "shard-00000") -> None:
    """Replace (or with None, drop) one column of a shard's captions."""
    path = store / f"{shard}.parquet"
    table = pq.read_table(path)
    index = table.column_names.index(column)
    pq.write_table(table.remove_column(index) if values is None else table.set_column(index, column, values), path)


def _empty_shard_claiming(store: Path, shape: tuple[int, ...]) -> None:
    """Shard 1 says in meta.json it holds no rows (every sample of its source skipped); its .npy claims `shape`."""
    _edit_meta(store, lambda m: m["store"]["shards"][1].update(rows=0, captions=0))
    _edit_meta(store, lambda m: m.update(num_images=4, num_captions=7))
    _edit_captions(store, "row", None, "shard-00001")
    empty = {"image_id": pa.array([], pa.int64()), "caption": pa.array([], pa.string()), "row": pa.array([], pa.int64())}
    pq.write_table(pa.table(empty), store / "shard-00001.parquet")
    _npy_header(store / "shard-00001.npy", shape)


_IDS = [100, 99, 99, 98, 98, 98]  # shard 0's captions


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda s: _cut(s / "shard-00001.npy", 0), "shard-00001.npy: truncated or not a .npy file"),
        # Read, not mapped (no rows to map): the header's claim of 4 TB was allocated.
        (lambda s: _empty_shard_claiming(s, (10**12, 6)), "shard-00001.npy: holds float32 (1000000000000, 6), meta.json says fp32 (0, 6)"),
        (lambda s: _edit_meta(s, lambda m: m["store"]["shards"].append(m["store"]["shards"][0])), "lists shard shard-00000 twice"),
        (lambda s: _edit_meta(s, lambda m: m["store"]["shards"][0].update(name="shard\0x")), "is not a shard's name"),
        (lambda s: _edit_meta(s, lambda m: m["store"]["shards"][0].update(name="meta")), "'meta' is not a shard's name"),
        (lambda s: _edit_meta(s, lambda m: m["store"]["shards"][2].update(rows=True)), "shard entry without"),
        (lambda s: _edit_meta(s, lambda m: m.update(num_images=1000)), "meta.json says num_images 1000, its shards hold 7"),
        (lambda s: _edit_meta(s, lambda m: m.update(num_captions=3)), "meta.json says num_captions 3, its shards hold 13"),
        (lambda s: _edit_meta(s, lambda m: m.update(feature_dim=True)), "feature_dim True in meta.json"),
        (lambda s: _edit_captions(s, "row", None), "shard-00000.parquet: has no column 'row'"),
        (lambda s: _edit_captions(s, "row", pa.array(["0", "0", "1", "1", "2", "2"])), "column 'row' holds string, not int64"),
        (lambda s: _edit_captions(s, "row", pa.array([0.5, 0, 1, 1, 2, 2])), "column 'row' holds double, not int64"),
        (lambda s: _edit_captions(s, "row", pa.array([None, 0, 1, 1, 2, 2], pa.int64())), "column 'row' has 1 null value"),
        (lambda s: _edit_captions(s, "caption", pa.array([None, *"abcde"])), "column 'caption' has 1 null value"),
        (lambda s: _edit_captions(s, "image_id", pa.array([None, *_IDS[1:]], pa.int64())), "column 'image_id' has 1 null"),
        (lambda s: _edit_captions(s, "image_id", pa.array([float(i) for i in _IDS])), "column 'image_id' holds double, not int64 or string"),
        (lambda s: _edit_captions(s, "image_id", pa.array([[i] for i in _IDS])), "column 'image_id' holds list<"),
    ],
)
def test_lying_stores_are_refused_in_one_line_before_anything_is_allocated(tmp_path, damage, message):
    """Cases the adversarial pass found accepted, crashing, allocating what a header claims, or misnamed."""
    store = make_store(tmp_path, sample_features())
    damage(store)
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match=re.escape(message)) as caught:
            read_features(store)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "\n" not in str(caught.value)
    assert peak < 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_a_captions_file_whose_bytes_differ_from_its_checksum_is_refused_by_the_converter(tmp_path):
    store = make_store(tmp_path, sample_features())
    table = pq.read_table(store / "shard-00002.parquet")
    pq.write_table(table.set_column(1, "caption", pa.array(["edited"])), store / "shard-00002.parquet")
    read_features(store)  # a run does not read whole files to open a store; the converter does
    with pytest.raises(InputError, match=r"shard-00002\.parquet: its content does not match the checksum"):
        convert_features.main(convert_features.parse_args([str(store), str(tmp_path / "out.pkl")]))


def test_values_beyond_fp16_are_refused_naming_row_and_image_and_the_earlier_store_stays(tmp_path):
    features = sample_features()
    store = make_store(tmp_path, features)  # an earlier store at the target
    features.embeddings[4, 2] = 70_000.0  # finite in fp32, infinity in fp16 (whose largest value is 65504)
    write_feature_file(tmp_path / "large.pkl", features)
    flags = [str(tmp_path / "large.pkl"), str(store), "--rows_per_shard", "3", "--feature_dtype", "fp16"]
    with pytest.raises(InputError, match=rf"{store}: 1 row\(s\) overflow fp16, whose largest value is 65504 \(rows 4; the first is image 96\); write the store in fp32 \(--feature_dtype fp32\)") as caught:
        convert_features.main(convert_features.parse_args(flags))
    assert "\n" not in str(caught.value)
    assert torch.equal(read_features(store).embeddings[:], sample_features().embeddings)  # checked before replacing
    convert_features.main(convert_features.parse_args([*flags[:-1], "fp32"]))
    assert torch.equal(read_features(store).embeddings[:], features.embeddings)


def test_every_writer_of_shards_refuses_rows_beyond_fp16_and_writes_nothing(tmp_path):
    """write_shard is where an extraction (folder or webdataset) writes its shards."""
    embeddings = np.array([[1.0, 2.0], [3.0, -1e5], [5.0, 6.0]], dtype=np.float32)
    captions = [("a", "x", 0), ("b", "y", 1), ("b", "z", 1), ("c", "w", 2)]
    with pytest.raises(InputError, match=r"shard-00000\.npy: 1 row\(s\) overflow fp16, whose largest value is 65504 \(rows 1; the first is image 'b'\)"):
        write_shard(tmp_path, "shard-00000", embeddings, captions, "fp16")
    assert list(tmp_path.iterdir()) == []
    assert write_shard(tmp_path, "shard-00000", embeddings, captions, "fp32")["rows"] == 3


def test_a_nonfinite_row_in_a_store_is_refused_naming_its_shard_and_row_where_it_is_read(tmp_path, tiny_gpt2_dir):
    features = sample_features()
    store = make_store(tmp_path, features, "--feature_dtype", "fp16")
    shard = np.load(store / "shard-00001.npy", mmap_mode="r+")
    shard[1, 3] = np.inf  # store row 4: what an fp16 store written before the check holds for a large value
    shard.flush()
    del shard
    opened = read_features(store)  # opening reads no embeddings
    assert torch.equal(opened.embeddings[[6, 0, 3]], features.embeddings[[6, 0, 3]].half().float())
    message = r"shard-00001\.npy: 1 feature row\(s\) hold NaN or infinite values \(rows 1\)"
    for index in (4, torch.tensor(4), [6, 4, 0], slice(None)):
        with pytest.raises(InputError, match=message):
            opened.embeddings[index]
    with pytest.raises(InputError, match=message):
        opened.embeddings.numpy()
    with pytest.raises(InputError, match=message):
        train.main(train.parse_args(train_args(store, tmp_path / "run", tiny_gpt2_dir, "--epochs", "1")))


def test_converter_checks_every_byte_and_refuses_what_it_cannot_write(tmp_path):
    features = sample_features()
    store = make_store(tmp_path, features)
    shard = store / "shard-00001.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    with pytest.raises(InputError, match="shard-00001.npy: its content does not match"):
        convert_features.main(convert_features.parse_args([str(store), str(tmp_path / "out.pkl")]))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(InputError, match="holds files that are not a feature store's"):
        convert_features.main(convert_features.parse_args([str(tmp_path / "features.pkl"), str(tmp_path / "notes")]))
    convert_features.main(convert_features.parse_args([str(tmp_path / "features.pkl"), str(store)]))  # replaced
    assert torch.equal(read_features(store).embeddings[:], features.embeddings)
    mixed = FeatureFile(features.embeddings[:2], [
        {"image_id": 1, "caption": "a", "clip_embedding": 0}, {"image_id": "b", "caption": "b", "clip_embedding": 1}
    ])  # fmt: skip
    write_feature_file(tmp_path / "mixed.pkl", mixed)
    with pytest.raises(InputError, match="mix numbers and text"):
        convert_features.main(convert_features.parse_args([str(tmp_path / "mixed.pkl"), str(tmp_path / "m")]))


def test_train_predict_and_references_read_the_store_as_the_pickle(tmp_path, tiny_gpt2_dir, capsys):
    features = sample_features(num_images=8, feature_dim=16)
    store = make_store(tmp_path, features)
    pickle_file = tmp_path / "features.pkl"
    runs = {}
    for name, data in (("pickle", pickle_file), ("store", store)):
        out = tmp_path / name
        args = train_args(data, out, tiny_gpt2_dir, "--epochs", "2", "--val_data", str(data), "--seed", "3")
        train.main(train.parse_args(args))
        runs[name] = read_log(out)
    losses = {name: [(r.get("loss"), r.get("val_loss")) for r in log] for name, log in runs.items()}
    assert losses["store"] == losses["pickle"] and len(losses["store"]) > 4

    outputs = {}
    for name, data in (("pickle", pickle_file), ("store", store)):
        checkpoint = tmp_path / name / "coco_prefix-001.pt"
        capsys.readouterr()
        predict.main(predict.parse_args(["--features", str(data), "--checkpoint", str(checkpoint)]))
        outputs[name] = capsys.readouterr().out
    assert outputs["store"] == outputs["pickle"] and outputs["store"].count("\n") == 8
    assert load_references(store) == load_references(pickle_file)


def test_shards_hold_about_shard_bytes_of_embeddings_unless_rows_per_shard_is_given(tmp_path, monkeypatch):
    assert default_rows_per_shard((50, 768), "fp16") == 13_981  # COCO's 123k ViT-B/32 token rows: 9 shards
    assert default_rows_per_shard((512,), "fp32") == 524_288
    assert default_rows_per_shard((2**31,), "fp32") == 1  # a row larger than the target has a shard to itself
    monkeypatch.setattr("data.store.SHARD_BYTES", 2 * 6 * 4)  # two fp32 rows of sample_features, four fp16 ones
    features = sample_features()  # 7 rows
    write_feature_file(tmp_path / "features.pkl", features)
    for flags, rows in (([], [2, 2, 2, 1]), (["--feature_dtype", "fp16"], [4, 3]), (["--rows_per_shard", "5"], [5, 2])):
        store = tmp_path / f"store{len(rows)}"
        convert_features.main(convert_features.parse_args([str(tmp_path / "features.pkl"), str(store), *flags]))
        assert [shard["rows"] for shard in json.loads((store / META_FILE).read_text())["store"]["shards"]] == rows
        opened = read_features(store)
        assert list(opened.captions) == features.captions
        assert torch.equal(opened.embeddings[:], features.embeddings.half().float() if "fp16" in flags else features.embeddings)
