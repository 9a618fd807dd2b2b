"""The caption datastore (build_datastore.py) and retrieval (data/retrieval.py) on the tiny whole CLIP: built from
each input kind, checked on open, searched as brute-force cosine does, own captions left out, results cached."""

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import build_datastore
import parse_coco_clip
from data.annotations import read_annotations
from data.datastore import Datastore, IndexParams, build_index, read_datastore
from data.errors import InputError
from data.features import FeatureFile
from data.retrieval import cache_path, retrieve_captions
from data.store import read_features
from models.tiny import save_tiny_clip_model
from tests.test_text_only import text_tower


def build(output, clip, *source: str) -> dict:
    """build_datastore.py with the tiny CLIP, in 5-caption batches."""
    argv = [*source, "--clip_model_type", str(clip), "--output_dir", str(output), "--batch_size", "5"]
    return build_datastore.main(build_datastore.parse_args([*argv, "--device", "cpu"]))


@pytest.fixture(scope="module")
def setup(synthetic, tmp_path_factory) -> dict:
    """The train images' CLIP features and a flat datastore of the train captions."""
    root = tmp_path_factory.mktemp("datastore")
    features = root / "train.pkl"
    parse_coco_clip.main(
        parse_coco_clip.parse_args(
            ["--clip_model_type", str(synthetic["clip"]), "--coco_images_dir", str(synthetic["images"])]
            + ["--captions_file", str(synthetic["dataset"]), "--split", "train", "--output_file", str(features)]
            + ["--num_workers", "0", "--device", "cpu"]
        )
    )
    store = root / "store"
    build(store, synthetic["clip"], "--captions_file", str(synthetic["dataset"]), "--split", "train")
    return {"root": root, "features": features, "store": store}


def unique_train_captions(synthetic) -> list[str]:
    records = read_annotations(synthetic["dataset"], "train")
    return list(dict.fromkeys(caption.strip() for record in records for caption in record.captions))


def test_captions_file_datastore_holds_the_normalized_text_embeddings_and_checksums(synthetic, setup):
    datastore = read_datastore(setup["store"])
    captions = unique_train_captions(synthetic)
    assert datastore.captions == captions
    stored = torch.from_numpy(datastore.index.reconstruct_n(0, len(captions)))
    torch.testing.assert_close(stored, F.normalize(text_tower(synthetic["clip"], captions), dim=-1), atol=1e-5, rtol=1e-5)
    meta = json.loads((setup["store"] / "meta.json").read_text())
    for name, field in (("index.faiss", "index_sha256"), ("captions.parquet", "captions_sha256")):
        assert meta[field] == hashlib.sha256((setup["store"] / name).read_bytes()).hexdigest()
    assert meta["count"] == len(captions) and meta["normalization"] == "l2" and meta["index_type"] == "flat"
    assert meta["encoder"] == read_features(setup["features"]).meta["encoder"]  # the image extraction's spec


def test_corpus_and_features_inputs_give_the_same_datastore(synthetic, setup, tmp_path):
    captions = unique_train_captions(synthetic)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(captions + captions[:3]) + "\n")  # duplicates are embedded once
    build(tmp_path / "from_corpus", synthetic["clip"], "--corpus", str(corpus))
    build(tmp_path / "from_features", synthetic["clip"], "--features", str(setup["features"]))
    expected = read_datastore(setup["store"])
    for name in ("from_corpus", "from_features"):
        datastore = read_datastore(tmp_path / name)
        assert datastore.captions == expected.captions
        assert np.allclose(datastore.index.reconstruct_n(0, len(datastore)), expected.index.reconstruct_n(0, len(datastore)), atol=1e-6)


def test_flat_retrieval_equals_brute_force_cosine(setup, tmp_path):
    features = read_features(setup["features"])
    datastore = read_datastore(setup["store"])
    ids = np.array(retrieve_captions(features, datastore, k=4, cache_dir=tmp_path))
    texts = torch.from_numpy(datastore.index.reconstruct_n(0, len(datastore)))  # (M, D) unit rows
    cosine = F.normalize(features.embeddings, dim=-1) @ texts.T  # (N, M)
    best = cosine.topk(4, dim=-1)
    # The same captions, or on a tie ones of the same score: the scores of faiss's ids are the top-k scores.
    torch.testing.assert_close(torch.gather(cosine, 1, torch.from_numpy(ids)), best.values, atol=1e-5, rtol=0)
    assert (ids == best.indices.numpy()).mean() > 0.9


def test_ivfpq_recall_against_flat_on_generated_captions():
    # 500 clustered unit vectors of width 32 (one PQ code per dimension): what is lost is IVF's and 8-bit codes'.
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(8, 32))
    rows = centers[rng.integers(0, 8, 500)] + 0.3 * rng.normal(size=(500, 32))
    embeddings = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)  # (500, 32)
    queries = embeddings[:50] + 0.05 * rng.normal(size=(50, 32)).astype(np.float32)
    flat = build_index(embeddings, IndexParams("flat", 0, 0, 0, 0, 0))
    ivfpq = build_index(embeddings, IndexParams("ivfpq", nlist=4, pq_m=32, train_sample=500, nprobe=4, seed=0))
    _, exact = flat.search(queries, 4)
    _, approximate = ivfpq.search(queries, 4)
    recall = np.mean([len(set(a) & set(b)) / 4 for a, b in zip(exact, approximate)])
    assert recall >= 0.9


def test_ivfpq_datastore_builds_and_opens(synthetic, setup, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"caption number {i} of a shape" for i in range(300)) + "\n")
    ivfpq = ["--index_type", "ivfpq", "--nlist", "4", "--pq_m", "4", "--nprobe", "4"]
    meta = build(tmp_path / "ivfpq", synthetic["clip"], "--corpus", str(corpus), *ivfpq)
    assert (meta["index_type"], meta["nlist"], meta["pq_m"], meta["count"]) == ("ivfpq", 4, 4, 300)
    assert len(read_datastore(tmp_path / "ivfpq")) == 300
    with pytest.raises(InputError, match="needs at least 256"):
        build(tmp_path / "small", synthetic["clip"], "--corpus", str(corpus), *ivfpq, "--train_sample", "100")


def copy_store(source, target):
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


@pytest.mark.parametrize("damage", ["index", "captions", "count", "meta"])
def test_a_damaged_datastore_is_refused_in_one_line(setup, tmp_path, damage):
    store = copy_store(setup["store"], tmp_path / "damaged")
    if damage in ("index", "captions"):
        path = store / ("index.faiss" if damage == "index" else "captions.parquet")
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "count":
        meta = json.loads((store / "meta.json").read_text())
        (store / "meta.json").write_text(json.dumps({**meta, "count": meta["count"] + 1}))
    else:
        (store / "meta.json").write_text("{not json")
    with pytest.raises(InputError) as error:
        read_datastore(store)
    message = str(error.value)
    assert "\n" not in message and str(store) in message
    assert {"index": "index.faiss does not match", "captions": "captions.parquet does not match",
            "count": "counts", "meta": "not valid JSON"}[damage] in message  # fmt: skip


def test_another_clips_datastore_is_refused(synthetic, setup, tmp_path):
    captions = unique_train_captions(synthetic)
    other = save_tiny_clip_model(tmp_path / "other_clip", captions, image_size=32, patch_size=16, projection_dim=16)
    build(tmp_path / "other", other, "--captions_file", str(synthetic["dataset"]), "--split", "train")
    with pytest.raises(InputError, match="expects clip") as error:
        retrieve_captions(read_features(setup["features"]), read_datastore(tmp_path / "other"), cache_dir=tmp_path)
    assert "\n" not in str(error.value)


def test_exclude_own_drops_the_images_own_captions(setup, tmp_path):
    features = read_features(setup["features"])
    datastore = read_datastore(setup["store"])
    own: list[set] = [set() for _ in range(len(features.embeddings))]
    for caption in features.captions:
        own[caption["clip_embedding"]].add(caption["caption"].strip())
    every = np.array(retrieve_captions(features, datastore, k=4, cache_dir=tmp_path))
    assert any(datastore.captions[i] in own[row] for row in range(len(own)) for i in every[row])  # they rank high
    left_out = np.array(retrieve_captions(features, datastore, k=4, exclude_own=True, cache_dir=tmp_path))
    assert (left_out >= 0).all()
    assert not any(datastore.captions[i] in own[row] for row in range(len(own)) for i in left_out[row])
    for row in range(len(own)):  # in the same order: the nearest captions that are not the image's own first
        others = [i for i in every[row] if datastore.captions[i] not in own[row]]
        assert list(left_out[row][: len(others)]) == others


def test_the_cache_is_reused_and_a_damaged_one_recomputed(setup, tmp_path, monkeypatch):
    features = read_features(setup["features"])
    datastore = read_datastore(setup["store"])
    first = np.array(retrieve_captions(features, datastore, k=3, cache_dir=tmp_path))
    path = cache_path(tmp_path, features, datastore, 3, False)
    assert path.is_file()
    searches = []
    search = Datastore.search
    monkeypatch.setattr(Datastore, "search", lambda self, *a: searches.append(1) or search(self, *a))
    cached = retrieve_captions(features, datastore, k=3, cache_dir=tmp_path)
    assert isinstance(cached, np.memmap) and np.array_equal(cached, first) and not searches
    path.write_bytes(path.read_bytes()[:-8])  # torn
    assert np.array_equal(retrieve_captions(features, datastore, k=3, cache_dir=tmp_path), first) and searches
    assert retrieve_captions(features, datastore, k=3, cache_dir=tmp_path).shape == first.shape


def test_build_refuses_bad_sources_and_outputs(synthetic, setup, tmp_path):
    with pytest.raises(InputError, match="exactly one of"):
        build(tmp_path / "out", synthetic["clip"], "--corpus", "a.txt", "--features", str(setup["features"]))
    with pytest.raises(InputError, match="already exists"):
        build(setup["store"], synthetic["clip"], "--features", str(setup["features"]))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not a datastore"):
        build(tmp_path / "other", synthetic["clip"], "--features", str(setup["features"]), "--overwrite")


def test_a_patch_token_file_is_refused_in_one_line(setup, tmp_path):
    pooled = read_features(setup["features"])
    tokens = FeatureFile(pooled.embeddings[:, None].expand(-1, 5, -1), pooled.captions,
                         {**pooled.meta, "encoder": {**pooled.meta["encoder"], "feature_type": "patch_tokens"}})  # fmt: skip
    with pytest.raises(InputError, match="holds patch tokens") as error:
        retrieve_captions(tokens, read_datastore(setup["store"]), cache_dir=tmp_path, source="--features x.pkl")
    assert str(error.value).startswith("--features x.pkl: ") and "\n" not in str(error.value)
