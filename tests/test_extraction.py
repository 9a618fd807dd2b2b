"""Stage 1 end to end: parse_coco_clip.py / parse_coco_dino.py on generated COCO-like data with bad files,
row alignment, batch-size invariance, resume, and a 2-process torchrun run."""

import json
import math
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data.store
import parse_coco_clip
import parse_coco_dino
import stages.extract
from data.annotations import ImageRecord
from data.errors import InputError, exit_on_input_error
from data.features import read_feature_file
from data.images import load_rgb
from data.store import META_FILE, read_features
from models.encoders import load_encoder
from stages.extract_merge import merge_partial_results, skipped_path
from stages.extract_resume import Chunk, PartialStore
from tests.conftest import run_torchrun

REPO = Path(__file__).resolve().parents[1]
CAPTIONS_PER_IMAGE = 5
# image id -> how its file is made; the last four cannot be encoded.
GOOD = {1: "rgb", 2: "gray", 3: "cmyk", 4: "rgba_png", 5: "sixteen_bit_png", 6: "palette_png", 7: "rgb", 8: "rgb"}
BAD = {
    11: ("truncated", "cannot decode"),
    12: ("missing", "missing file"),  # even: ClipCap falls back to val2014, where it is looked for
    13: ("empty", "empty file"),
    14: ("text", "not an image"),
}


def coco_path(images_dir: Path, image_id: int) -> Path:
    """Odd ids in train2014/, even ids in val2014/, so path resolution is exercised both ways."""
    folder = "train2014" if image_id % 2 else "val2014"
    return images_dir / folder / f"COCO_{folder}_{image_id:012d}.jpg"


def write_image(path: Path, kind: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    height, width = 40 + 6 * seed, 64
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if kind == "rgb":
        rgb.save(path, format="JPEG")
    elif kind == "gray":
        rgb.convert("L").save(path, format="JPEG")
    elif kind == "cmyk":
        rgb.convert("CMYK").save(path, format="JPEG")
    elif kind == "rgba_png":
        rgb.convert("RGBA").save(path, format="PNG")  # PNG bytes under a .jpg name: decoded by content
    elif kind == "sixteen_bit_png":
        Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16)).save(path, format="PNG")
    elif kind == "palette_png":
        rgb.convert("P").save(path, format="PNG")
    elif kind == "truncated":
        rgb.save(path, format="JPEG")
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not an image")


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """A COCO-like tree and a ClipCap caption list: 5 captions per image, interleaved as in COCO's files."""
    root = tmp_path_factory.mktemp("coco")
    images_dir = root / "images"
    for folder in ("train2014", "val2014"):
        (images_dir / folder).mkdir(parents=True)
    kinds = {**GOOD, **{image_id: kind for image_id, (kind, _) in BAD.items()}}
    for image_id, kind in kinds.items():
        if kind != "missing":
            write_image(coco_path(images_dir, image_id), kind, seed=image_id)
    entries = [
        {"image_id": image_id, "caption": f"image {image_id} caption {k}", "id": 100 * image_id + k}
        for k in range(CAPTIONS_PER_IMAGE)
        for image_id in kinds
    ]
    captions_file = root / "train_caption.json"
    captions_file.write_text(json.dumps(entries))
    return {"images_dir": images_dir, "captions_file": captions_file, "root": root}


def clip_args(coco, model_dir, output_file, *extra) -> list[str]:
    return [
        "--clip_model_type",
        str(model_dir),
        "--coco_images_dir",
        str(coco["images_dir"]),
        "--captions_file",
        str(coco["captions_file"]),
        "--output_file",
        str(output_file),
        "--device",
        "cpu",
        *extra,
    ]


def read_store_meta(store: Path) -> dict:
    return json.loads((store / META_FILE).read_text())


def run_clip(coco, model_dir, output_file, *extra):
    """Run parse_coco_clip.py in this process, as its __main__ would."""
    return parse_coco_clip.main(parse_coco_clip.parse_args(clip_args(coco, model_dir, output_file, *extra)))


def test_clip_script_end_to_end(coco, tiny_clip_dir, tmp_path, capsys):
    """One row per image (5 captions each), bad images skipped and listed, rows aligned; decoding in workers."""
    output_file = tmp_path / "clip.pkl"
    run_clip(coco, tiny_clip_dir, output_file, "--batch_size", "3", "--num_workers", "2")
    stdout = capsys.readouterr().out
    features = read_feature_file(output_file)
    assert features.embeddings.shape == (len(GOOD), 32)
    assert len(features.captions) == CAPTIONS_PER_IMAGE * len(GOOD)
    assert features.image_rows() == {image_id: row for row, image_id in enumerate(GOOD)}
    for caption in features.captions:
        assert caption["caption"].startswith(f"image {caption['image_id']} caption")

    encoder, preprocess = load_encoder(str(tiny_clip_dir))
    with torch.inference_mode():
        expected = torch.cat([encoder(preprocess(load_rgb(coco_path(coco["images_dir"], i)))[None]) for i in GOOD])
    torch.testing.assert_close(features.embeddings, expected, atol=1e-5, rtol=1e-5)

    meta = features.meta
    assert meta["encoder"] == encoder.spec.to_dict()
    assert (meta["feature_type"], meta["feature_dim"], meta["image_size"], meta["split"]) == (
        "image_embeds",
        32,
        224,
        None,
    )
    assert (meta["num_images"], meta["num_captions"], meta["num_skipped"]) == (len(GOOD), 5 * len(GOOD), len(BAD))
    assert meta["captions_file"] == str(coco["captions_file"]) and meta["precision"] == "fp32"

    report = json.loads((tmp_path / "clip.skipped.json").read_text())
    assert [(entry["image_id"], entry["reason"].split(" (")[0]) for entry in report["skipped"]] == [
        (i, reason) for i, (_, reason) in BAD.items()
    ]
    for image_id, (_, reason) in BAD.items():
        assert f"skipped {coco_path(coco['images_dir'], image_id)}: {reason}" in stdout
    assert "config:" in stdout and "4 images skipped" in stdout
    assert not (tmp_path / "clip.pkl.partial").exists()


def test_dino_script_reads_karpathy_splits(coco, tiny_dino_dir, tmp_path):
    images = [
        {
            "filepath": coco_path(coco["images_dir"], i).parent.name,
            "filename": coco_path(coco["images_dir"], i).name,
            "cocoid": i,
            "split": split,
            "sentences": [{"raw": f"dino {i} {k}"} for k in range(5)],
        }
        for i, split in ((1, "train"), (2, "restval"), (3, "test"), (13, "train"))
    ]
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": images}))
    output_file = tmp_path / "dino.pkl"
    arguments = [
        "--dino_model_type",
        str(tiny_dino_dir),
        "--coco_images_dir",
        str(coco["images_dir"]),
        "--captions_file",
        str(karpathy),
    ]
    arguments += [
        "--output_file",
        str(output_file),
        "--split",
        "train+restval",
        "--feature_type",
        "cls_avg_patch",
        "--num_workers",
        "0",
    ]
    parse_coco_dino.main(parse_coco_dino.parse_args(arguments))
    features = read_feature_file(output_file)
    assert features.embeddings.shape == (2, 64)  # CLS and mean patch of a 32-wide model; id 13 is missing
    assert features.image_rows() == {1: 0, 2: 1}
    assert features.meta["split"] == "train+restval" and features.meta["feature_type"] == "cls_avg_patch"
    assert (features.meta["encoder"]["resize_dim"], features.meta["encoder"]["crop_dim"]) == (256, 224)


def test_features_do_not_depend_on_batch_size(coco, tiny_clip_dir, tmp_path):
    embeddings = []
    for batch_size in (1, 4, 64):
        output_file = tmp_path / f"b{batch_size}.pkl"
        run_clip(coco, tiny_clip_dir, output_file, "--batch_size", str(batch_size), "--num_workers", "0")
        embeddings.append(read_feature_file(output_file).embeddings)
    for other in embeddings[1:]:
        # Equal up to the float rounding of CPU matrix kernels, which block differently per batch size.
        torch.testing.assert_close(other, embeddings[0], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("output_format", ["pickle", "shards"])
def test_nothing_encoded_exits_non_zero_with_one_line(coco, tiny_clip_dir, tmp_path, capsys, output_format):
    captions_file = tmp_path / "bad_only.json"
    captions_file.write_text(json.dumps([{"image_id": i, "caption": "x"} for i in BAD]))
    output_file = tmp_path / ("none.pkl" if output_format == "pickle" else "none")
    arguments = clip_args(coco, tiny_clip_dir, output_file, "--num_workers", "0", "--output_format", output_format)
    arguments[arguments.index("--captions_file") + 1] = str(captions_file)
    with pytest.raises(SystemExit) as exit_info, exit_on_input_error():
        parse_coco_clip.main(parse_coco_clip.parse_args(arguments))
    assert exit_info.value.code != 0
    error_lines = capsys.readouterr().err.strip().splitlines()
    assert error_lines[-1].startswith("error: no image could be encoded (4 skipped, listed in")
    assert not output_file.exists() and not Path(f"{output_file}.partial").exists()
    assert json.loads((tmp_path / "none.skipped.json").read_text())["num_skipped"] == len(BAD)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--coco_images_dir", "{tmp}/no_such_dir", "--coco_images_dir {tmp}/no_such_dir: no such directory"),
        ("--captions_file", "{tmp}/broken.json", "{tmp}/broken.json: not valid JSON"),
        ("--clip_model_type", "ViT-H/14", "unknown image encoder 'ViT-H/14'"),
        ("--clip_model_type", "RN50", "RN50: OpenAI's ResNet CLIP models have no transformers version"),
    ],
)
def test_bad_input_stops_with_one_line(coco, tiny_clip_dir, tmp_path, capsys, flag, value, message):
    (tmp_path / "broken.json").write_text('[{"image_id": 1, "caption": "unterminated}')
    arguments = clip_args(coco, tiny_clip_dir, tmp_path / "out.pkl")
    arguments[arguments.index(flag) + 1] = value.format(tmp=tmp_path)
    with pytest.raises(SystemExit) as exit_info, exit_on_input_error():
        parse_coco_clip.main(parse_coco_clip.parse_args(arguments))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: " + message.format(tmp=tmp_path)) and "\n" not in error
    assert not (tmp_path / "out.pkl").exists()


def test_resume_continues_without_re_encoding_and_equals_an_uninterrupted_run(
    coco, tiny_clip_dir, tmp_path, monkeypatch
):
    options = ("--batch_size", "2", "--checkpoint_every", "4", "--num_workers", "0")
    run_clip(coco, tiny_clip_dir, tmp_path / "whole.pkl", *options)

    original = stages.extract.iter_encoded_batches
    encoded_paths: list[Path] = []

    def interrupted_after_three_batches(encoder, preprocess, paths, **kwargs):
        for number, batch in enumerate(original(encoder, preprocess, paths, **kwargs)):
            if number == 3:
                raise KeyboardInterrupt  # as Ctrl-C or a kill between two batches
            yield batch

    def counting(encoder, preprocess, paths, **kwargs):
        encoded_paths.extend(paths)
        yield from original(encoder, preprocess, paths, **kwargs)

    output_file = tmp_path / "resumed.pkl"
    monkeypatch.setattr(stages.extract, "iter_encoded_batches", interrupted_after_three_batches)
    with pytest.raises(KeyboardInterrupt):
        run_clip(coco, tiny_clip_dir, output_file, *options)
    assert not output_file.exists()  # never a partial feature file at --output_file
    assert len(list((tmp_path / "resumed.pkl.partial").glob("chunk-*.pt"))) == 1  # 4 images saved, 2 lost

    other_captions = tmp_path / "other_captions.json"
    other_captions.write_text(json.dumps([{"image_id": 1, "caption": "only one image"}]))
    other = clip_args(coco, tiny_clip_dir, output_file, *options, "--resume")
    other[other.index("--captions_file") + 1] = str(other_captions)
    with pytest.raises(
        InputError, match=r"partial results were made with other settings \(captions_file, image_paths_sha256"
    ):
        parse_coco_clip.main(parse_coco_clip.parse_args(other))

    monkeypatch.setattr(stages.extract, "iter_encoded_batches", counting)
    run_clip(coco, tiny_clip_dir, output_file, *options, "--resume")
    all_paths = [coco_path(coco["images_dir"], image_id) for image_id in [*GOOD, *BAD]]
    assert encoded_paths == all_paths[4:]  # the 4 saved images are not read again
    resumed, whole = read_feature_file(output_file), read_feature_file(tmp_path / "whole.pkl")
    assert torch.equal(resumed.embeddings, whole.embeddings)
    assert resumed.captions == whole.captions and resumed.meta == whole.meta
    assert (tmp_path / "resumed.skipped.json").read_text().replace("resumed", "whole") == (
        tmp_path / "whole.skipped.json"
    ).read_text()
    assert not (tmp_path / "resumed.pkl.partial").exists()


# parse_coco_clip.py writing stores of 3 pooled rows (32 fp32 features) per shard.
SMALL_SHARDS = """
import sys
import data.store
import parse_coco_clip
data.store.SHARD_BYTES = 3 * 32 * 4
parse_coco_clip.main(parse_coco_clip.parse_args(sys.argv[1:]))
"""


@pytest.mark.parametrize("output_format", ["pickle", "shards"])
def test_torchrun_two_processes_write_one_merged_file(coco, tiny_clip_dir, tmp_path, output_format):
    """Each process encodes its share (gloo on CPU); rank 0 merges them into the file one process writes. A store
    comes in shards of 3 rows, so each shard takes rows from both processes' chunks."""
    run_clip(coco, tiny_clip_dir, tmp_path / "single.pkl", "--num_workers", "0")
    output_file = tmp_path / ("torchrun.pkl" if output_format == "pickle" else "torchrun")
    options = ("--num_workers", "0", "--batch_size", "2", "--checkpoint_every", "2", "--output_format", output_format)
    script = ["parse_coco_clip.py"] if output_format == "pickle" else ["--no-python", sys.executable, "-c", SMALL_SHARDS]
    completed = run_torchrun([*script, *clip_args(coco, tiny_clip_dir, output_file, *options)])
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("wrote ") == 1  # only rank 0 writes and reports
    assert "world_size: 2" in completed.stdout
    merged, single = read_features(output_file), read_feature_file(tmp_path / "single.pkl")
    torch.testing.assert_close(merged.embeddings[:], single.embeddings, atol=2e-6, rtol=1e-5)
    assert list(merged.captions) == single.captions and merged.meta == single.meta
    if output_format == "shards":
        assert [shard["rows"] for shard in read_store_meta(output_file)["store"]["shards"]] == [3, 3, 2]
    report = json.loads(skipped_path(output_file).read_text())
    assert [entry["image_id"] for entry in report["skipped"]] == list(BAD)


@pytest.mark.parametrize("feature_type", ["image_embeds", "patch_tokens"])
def test_a_store_written_shard_by_shard_equals_the_pickle(coco, tiny_clip_dir, tmp_path, monkeypatch, feature_type):
    """Chunks of 4 images (--checkpoint_every 3, batches of 2) and shards of 3 rows: shards take rows from
    several chunks, and equal the pickle of the same extraction row for row, caption for caption."""
    options = ("--feature_type", feature_type, "--checkpoint_every", "3", "--batch_size", "2", "--num_workers", "0")
    run_clip(coco, tiny_clip_dir, tmp_path / "features.pkl", *options)
    pickled = read_feature_file(tmp_path / "features.pkl")
    monkeypatch.setattr(data.store, "SHARD_BYTES", 3 * 4 * math.prod(pickled.row_shape))  # fp32 rows
    store_dir = tmp_path / "store"
    run_clip(coco, tiny_clip_dir, store_dir, *options, "--output_format", "shards", "--feature_dtype", "fp32")
    assert [shard["rows"] for shard in read_store_meta(store_dir)["store"]["shards"]] == [3, 3, 2]
    store = read_features(store_dir)
    assert torch.equal(store.embeddings[:], pickled.embeddings)
    assert list(store.captions) == pickled.captions and store.meta == pickled.meta
    reports = [json.loads(skipped_path(path).read_text()) for path in (store_dir, tmp_path / "features.pkl")]
    assert reports[0]["skipped"] == reports[1]["skipped"] and len(reports[0]["skipped"]) == len(BAD)
    assert not Path(f"{store_dir}.partial").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_features_match_cpu(coco, tiny_clip_dir, tmp_path):
    run_clip(coco, tiny_clip_dir, tmp_path / "cpu.pkl", "--num_workers", "0")
    run_clip(coco, tiny_clip_dir, tmp_path / "cuda.pkl", "--num_workers", "2", "--device", "cuda")  # last flag wins
    cpu, cuda = read_feature_file(tmp_path / "cpu.pkl"), read_feature_file(tmp_path / "cuda.pkl")
    assert cuda.meta["encoder"] == cpu.meta["encoder"] and cuda.captions == cpu.captions
    torch.testing.assert_close(cuda.embeddings, cpu.embeddings, atol=0.05, rtol=0.05)  # bf16 autocast


def test_the_merge_into_a_store_holds_about_one_shard_in_memory(tmp_path, monkeypatch):
    """Rank 0 merges two ranks' chunks (interleaved indices, 4 images each) of 50 x 768 token rows into fp16 shards
    of 12 rows: the merge's traced allocations (numpy's included) peak under two shards of float32 rows, less than
    a quarter of all rows (2.0 MiB of 16.5). The old merge stacked every row, then cast and serialized them whole
    (25 MiB), and fails this. The store holds every row."""
    row_shape, num_images, per_chunk, per_shard = (50, 768), 120, 4, 12
    rows = np.random.default_rng(0).standard_normal((num_images, *row_shape)).astype(np.float32)
    failed = {index: "cannot decode" for index in range(5, num_images, 17)}
    records = [ImageRecord(index, f"{index}.jpg", [f"caption {index} {k}" for k in range(2)]) for index in range(num_images)]
    partial = PartialStore(tmp_path / "store", {"settings": "any"})
    partial.start(fresh=True)
    for rank in range(2):
        mine = list(range(rank, num_images, 2))
        for start in range(0, len(mine), per_chunk):
            chunk, block = Chunk(), mine[start : start + per_chunk]
            encoded = [index for index in block if index not in failed]
            chunk.add(encoded, torch.from_numpy(rows[encoded]), [(index, failed[index]) for index in block if index in failed])
            partial.save(chunk)
    row_bytes = 4 * math.prod(row_shape)
    monkeypatch.setattr(data.store, "SHARD_BYTES", per_shard * row_bytes // 2)  # 12 fp16 rows
    paths = [tmp_path / record.file_path for record in records]

    tracemalloc.start()
    try:
        result = merge_partial_results(records, paths, partial, tmp_path / "store", {"encoder": {}}, "shards", None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    kept = [index for index in range(num_images) if index not in failed]
    assert peak < 2 * per_shard * row_bytes < len(kept) * row_bytes / 4, f"peak {peak / 2**20:.1f} MiB"

    meta = read_store_meta(tmp_path / "store")
    assert [shard["rows"] for shard in meta["store"]["shards"]] == [12] * 9 + [5]
    assert meta["store"]["feature_dtype"] == "fp16" and meta["num_skipped"] == len(failed)
    store = read_features(tmp_path / "store")
    assert torch.equal(store.embeddings[:], torch.from_numpy(rows[kept]).half().float())
    assert list(store.captions) == [
        {"image_id": index, "caption": f"caption {index} {k}", "clip_embedding": row}
        for row, index in enumerate(kept)
        for k in range(2)
    ]
    assert [entry["image_id"] for entry in result.skipped] == sorted(failed)
    assert not partial.directory.exists()


def test_a_damaged_chunk_file_is_refused_in_one_line(tmp_path):
    partial = PartialStore(tmp_path / "out.pkl", {"settings": "any"})
    partial.start(fresh=True)
    chunk = Chunk()
    chunk.add([0, 2], torch.zeros(2, 4), [(1, "cannot decode")])
    partial.save(chunk)
    assert partial.saved().failed == {1: "cannot decode"} and partial.saved().row_shape == (4,)
    path = partial.directory / "chunk-000000000.pt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(InputError, match=r"chunk-000000000\.pt: unreadable partial result \(.*\); delete it") as error:
        partial.saved()
    assert "\n" not in str(error.value)
    torch.save({"indices": [0, 2, 4], "features": torch.zeros(2, 4), "failures": []}, path)
    with pytest.raises(InputError, match=r"unreadable partial result \(3 indices for 2 feature rows\)"):
        partial.saved()
