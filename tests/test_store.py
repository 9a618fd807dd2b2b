"""The sharded feature store: exact round trips with the pickle, memory-mapped reading through the one
reader, refusal of half-written or mismatched stores, and train.py giving the same losses on either."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import convert_features
import predict
import train
from data.captions import captions_fingerprint, drop_long_captions, load_or_tokenize
from data.errors import InputError
from data.features import FeatureFile, read_feature_file, write_feature_file
from data.references import load_references
from data.store import META_FILE, CaptionTable, ShardedEmbeddings, default_rows_per_shard, read_features, read_store
from models.checkpoint import load_tokenizer
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
        (lambda s: _edit_meta(s, lambda m: m["store"]["shards"][0].update(name="../x")), "not a plain file name"),
        (lambda s: (s / META_FILE).write_text("{"), "not valid JSON"),
    ],
)
def test_damaged_or_mismatched_stores_are_refused_in_one_line(tmp_path, damage, message):
    store = make_store(tmp_path, sample_features())
    damage(store)
    with pytest.raises(InputError, match=message.replace(".", r"\.").replace("(", r"\(")) as caught:
        read_features(store)
    assert "\n" not in str(caught.value)


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
