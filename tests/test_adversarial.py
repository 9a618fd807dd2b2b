"""Adversarial inputs from issue 11: each is refused in one line (exit status 2), and nothing is lost."""

import errno
import json
import os
import pickle
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import parse_coco_clip
import parse_coco_dino
import predict
import train
from data.annotations import read_annotations
from data.atomic import atomic_directory, atomic_write, write_json_atomic
from data.errors import InputError, exit_on_input_error, read_json_input
from data.features import FeatureFile, read_feature_file, write_feature_file
from data.images import IMAGE_CONVERSION
from models.checkpoint import build_captioner, save_checkpoint
from models.config import CaptionerConfig
from models.encoders import ImageEncoder, load_encoder
from models.lm import load_lm
from stages.train_state import StepLog
from tests.conftest import TOKENIZER_TEXTS

SCRIPTS = {"predict": predict, "evaluate": evaluate, "clip": parse_coco_clip, "dino": parse_coco_dino, "train": train}


def run_script(name: str, argv: list[str], capsys) -> tuple[int, str]:
    """Run a script's main as its __main__ does; returns (exit status, stderr)."""
    script = SCRIPTS[name]
    capsys.readouterr()
    try:
        with exit_on_input_error():
            script.main(script.parse_args([str(arg) for arg in argv]))
    except SystemExit as exit_:
        return exit_.code, capsys.readouterr().err
    return 0, capsys.readouterr().err


def one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def save_png(path: Path, size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 40, 40)).save(path, format="PNG")
    return path


@pytest.fixture(scope="module")
def specs(tiny_clip_dir, tiny_dino_dir) -> dict[str, dict]:
    """The tiny CLIP and DINOv2 encoders' specs: both give 32-d features."""
    clip, dino = load_encoder(str(tiny_clip_dir))[0].spec.to_dict(), load_encoder(str(tiny_dino_dir))[0].spec.to_dict()
    assert clip["feature_dim"] == dino["feature_dim"]
    return {"clip": clip, "dinov2": dino}


def feature_file(path: Path, encoder: dict | None = None, embeddings: torch.Tensor | None = None) -> Path:
    """Rows of random features, two known captions each; `encoder` recorded in the meta (none: ClipCap's file)."""
    embeddings = torch.randn(4, 32, generator=torch.Generator().manual_seed(0)) if embeddings is None else embeddings
    captions = [
        {"image_id": row, "caption": TOKENIZER_TEXTS[(row + k) % 5], "clip_embedding": row}
        for row in range(embeddings.shape[0])
        for k in range(2)
    ]
    write_feature_file(path, FeatureFile(embeddings, captions, {"encoder": encoder} if encoder else {}))
    return path


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory, tiny_gpt2_dir, specs) -> Path:
    config = CaptionerConfig(feature_dim=32, prefix_length=2, lm_name=str(tiny_gpt2_dir), encoder=specs["clip"])
    path = tmp_path_factory.mktemp("checkpoint") / "clip-000.pt"
    save_checkpoint(path, build_captioner(config, load_lm(str(tiny_gpt2_dir))))
    return path


PREDICT = ["--device", "cpu", "--num_workers", "0", "--max_length", "3"]


# 6, 8c, 9: the extraction meta, huge-once-resized images, and paths that leave the images directory.


@pytest.fixture(scope="module")
def escaping_set(tmp_path_factory) -> dict[str, Path]:
    """COCO captions naming a good image, one behind a linked folder, a 20000x1 PNG, and paths outside
    the images directory (existing and missing, relative and absolute)."""
    root = tmp_path_factory.mktemp("escaping")
    images_dir = root / "images"
    save_png(images_dir / "good.png")
    save_png(root / "elsewhere" / "linked.png")
    (images_dir / "linked").symlink_to(root / "elsewhere")  # train2014 -> /mnt/...: must keep working
    save_png(images_dir / "wide.png", (20000, 1))
    save_png(root / "secret" / "x.png")
    names = ["good.png", "linked/linked.png", "wide.png", "../secret/x.png", "../secret/missing.png"]
    names.append(str(root / "secret" / "x.png"))
    annotations = {
        "images": [{"id": number, "file_name": name} for number, name in enumerate(names)],
        "annotations": [{"image_id": number, "caption": "a photo"} for number in range(len(names))],
    }
    (root / "captions.json").write_text(json.dumps(annotations))
    return {"root": root, "images_dir": images_dir, "captions": root / "captions.json"}


def extraction_args(data: dict, model_dir: Path, output: Path, *extra) -> list:
    return [
        "--clip_model_type", model_dir, "--coco_images_dir", data["images_dir"], "--captions_file", data["captions"],
        "--output_file", output, "--device", "cpu", "--num_workers", "0", *extra,
    ]  # fmt: skip


def test_paths_outside_the_images_dir_and_huge_images_are_skipped_with_one_reason(
    escaping_set, tiny_clip_dir, tmp_path, capsys
):
    output = tmp_path / "f.pkl"
    stale = tmp_path / ".f.pkl.k1ll3d00.tmp"  # a killed run's temporary: removed on the next run
    stale.write_bytes(b"x" * 100)
    code, _ = run_script("clip", extraction_args(escaping_set, tiny_clip_dir, output), capsys)
    assert code == 0 and not stale.exists()
    features = read_feature_file(output)
    assert list(features.image_rows()) == [0, 1]  # the good image and the one behind the linked folder
    assert features.meta["image_conversion"] == IMAGE_CONVERSION
    reasons = {
        entry["image_id"]: entry["reason"]
        for entry in json.loads(output.with_suffix(".skipped.json").read_text())["skipped"]
    }
    assert reasons.pop(2).startswith("too large once resized")
    assert reasons == {
        3: "outside the images directory",
        4: "outside the images directory",
        5: "outside the images directory",
    }

    code, _ = run_script(
        "clip", extraction_args(escaping_set, tiny_clip_dir, output, "--allow_outside_images_dir"), capsys
    )
    assert code == 0 and list(read_feature_file(output).image_rows()) == [0, 1, 3, 5]


def test_predict_names_a_huge_once_resized_image_in_an_error_line(tmp_path, clip_checkpoint, capsys):
    good, wide = save_png(tmp_path / "good.png"), save_png(tmp_path / "wide.png", (20000, 1))
    assert wide.stat().st_size < 400
    code, stderr = run_script("predict", [good, wide, "--checkpoint", clip_checkpoint, *PREDICT], capsys)
    assert code == 2 and f"error: {wide}: too large once resized (4480000x224, over 50 megapixels)" in stderr


# 8a, 17g: pickles that build huge views of tiny buffers, or hide other objects in a storage.


class ZeroStrideTensor:
    def __reduce__(self):
        storage = torch.zeros(1).storage()  # 4 bytes, shown as 4 MB (a real attack shows gigabytes)
        return torch._utils._rebuild_tensor_v2, (storage, 0, (1000, 1000), (0, 0), False, OrderedDict())


class ZeroStrideArray:
    def __reduce__(self):
        return np.ndarray, ((1000, 1000), np.dtype("float32"), b"abcd", 0, (0, 0))


class StorageHidingAnObject:
    def __reduce__(self):
        import io

        buffer = io.BytesIO()
        torch.save({"not": Path("a storage")}, buffer)
        return torch.storage._load_from_bytes, (buffer.getvalue(),)


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (ZeroStrideTensor(), r"shape \(1000, 1000\) and strides \(0, 0\) does not fit its buffer of 1 elements"),
        (ZeroStrideArray(), "refuses to call numpy.ndarray"),
        (StorageHidingAnObject(), "a tensor's storage holds more than tensor data"),
    ],
)
def test_pickles_that_allocate_or_hide_objects_are_one_line(tmp_path, payload, message):
    path = tmp_path / "bad.pkl"
    path.write_bytes(
        pickle.dumps({"clip_embedding": payload, "captions": [{"image_id": 1, "caption": "x", "clip_embedding": 0}]})
    )
    with pytest.raises(InputError, match=message) as error:
        read_feature_file(path)
    assert "\n" not in str(error.value) and "weights_only=False" not in str(error.value)


# 10, 17f, 16: outputs that are inputs, directories, links or devices are refused before any work.


@pytest.mark.parametrize("case", ["features", "checkpoint", "predictions", "captions"])
def test_an_output_that_is_an_input_is_refused_and_the_input_kept(tmp_path, case, clip_checkpoint, specs, capsys):
    clip_checkpoint = Path(shutil.copy(clip_checkpoint, tmp_path))  # a copy: unfixed, the run replaces it
    features = feature_file(tmp_path / "f.pkl", specs["clip"])
    predictions = tmp_path / "p.json"
    write_json_atomic(predictions, [{"image_id": 0, "caption": "a photo"}])
    captions = tmp_path / "a.json"
    captions.write_text(json.dumps([{"image_id": 1, "caption": "a photo"}]))
    (tmp_path / "images").mkdir()
    images = tmp_path / "images"
    cases = {  # script, its arguments, the input that the output names
        "features": ("predict", ["--features", features, "--checkpoint", clip_checkpoint, "--output", features], features),
        "checkpoint": ("predict", ["--features", features, "--checkpoint", clip_checkpoint, "--output", clip_checkpoint], clip_checkpoint),
        "predictions": ("evaluate", ["--predictions", predictions, "--references", features, "--output", predictions], predictions),
        "captions": ("clip", ["--coco_images_dir", images, "--captions_file", captions, "--output_file", captions], captions),
    }  # fmt: skip
    script, argv, victim = cases[case]
    before = victim.read_bytes()
    code, stderr = run_script(script, argv, capsys)
    assert code == 2 and "is the same file as" in one_error_line(stderr)
    assert victim.read_bytes() == before


def test_train_refuses_data_that_its_outputs_would_replace(tmp_path, tiny_gpt2_dir, capsys):
    data = feature_file(tmp_path / "run.json")
    code, stderr = run_script(
        "train", ["--data", data, "--out_dir", tmp_path, "--prefix", "run", "--gpt2", tiny_gpt2_dir], capsys
    )
    assert code == 2 and "is the same file as --data" in one_error_line(stderr)


@pytest.mark.parametrize("kind", ["directory", "fifo", "link", "dangling link"])
def test_outputs_that_are_not_regular_files_are_refused_at_start(tmp_path, kind, clip_checkpoint, specs, capsys):
    features = feature_file(tmp_path / "f.pkl", specs["clip"])
    output = tmp_path / "out"
    if kind == "directory":
        output.mkdir()
    elif kind == "fifo":
        os.mkfifo(output)
    else:
        (tmp_path / "target").write_text("kept")
        output.symlink_to(tmp_path / ("target" if kind == "link" else "elsewhere/none"))
    for script, argv in [
        ("predict", ["--features", features, "--checkpoint", clip_checkpoint, "--output", output, *PREDICT]),
        ("evaluate", ["--predictions", features, "--references", features, "--output", output]),
        ("clip", ["--coco_images_dir", tmp_path, "--captions_file", tmp_path / "none.json", "--output_file", output]),
    ]:
        code, stderr = run_script(script, argv, capsys)
        assert code == 2 and f"error: {output}: is " in one_error_line(stderr), (script, stderr)
    assert kind != "link" or (output.is_symlink() and (tmp_path / "target").read_text() == "kept")


def test_a_dangling_log_link_is_not_written_through(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    log = tmp_path / "run_log.jsonl"
    log.symlink_to(tmp_path / "elsewhere" / "log.jsonl")
    with pytest.raises(InputError, match="is a symbolic link"):
        StepLog(log, True, None)
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_a_linked_partial_store_is_refused(escaping_set, tiny_clip_dir, tmp_path, capsys):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "keep.txt").write_text("kept")
    (tmp_path / "f.pkl.partial").symlink_to(tmp_path / "precious")
    code, stderr = run_script("clip", extraction_args(escaping_set, tiny_clip_dir, tmp_path / "f.pkl"), capsys)
    assert code == 2 and "f.pkl.partial: is a symbolic link" in one_error_line(stderr)
    assert (tmp_path / "precious" / "keep.txt").read_text() == "kept"


# 13: features of another encoder of the same width.


def test_features_of_another_encoder_are_refused_by_predict_evaluate_and_train(
    tmp_path, clip_checkpoint, specs, tiny_gpt2_dir, monkeypatch, capsys
):
    dino_features = feature_file(tmp_path / "dino.pkl", specs["dinov2"])
    code, stderr = run_script(
        "predict", ["--features", dino_features, "--checkpoint", clip_checkpoint, *PREDICT], capsys
    )
    assert code == 2 and "holds features of dinov2" in one_error_line(stderr) and "the captioner expects clip" in stderr
    monkeypatch.setattr("stages.evaluate.require_java", lambda: None)  # refused before any tokenizing
    code, stderr = run_script(
        "evaluate", ["--features", dino_features, "--checkpoint", clip_checkpoint, "--device", "cpu"], capsys
    )
    assert code == 2 and "holds features of dinov2" in one_error_line(stderr)
    clip_features = feature_file(tmp_path / "clip.pkl", specs["clip"])
    argv = [
        "--data",
        clip_features,
        "--val_data",
        dino_features,
        "--out_dir",
        tmp_path / "run",
        "--gpt2",
        tiny_gpt2_dir,
    ]
    code, stderr = run_script("train", [*argv, "--cache_dir", tmp_path / "cache"], capsys)
    assert code == 2 and f"--data {clip_features} expects clip" in one_error_line(stderr)
    # ClipCap's files record no encoder: checked by width only, as before.
    assert (
        run_script(
            "predict",
            ["--features", feature_file(tmp_path / "bare.pkl"), "--checkpoint", clip_checkpoint, *PREDICT],
            capsys,
        )[0]
        == 0
    )


# 14: non-finite and empty features.


@pytest.mark.parametrize(
    ("embeddings", "message"),
    [
        (
            torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [1.0, 2.0], [0.0, float("inf")]]),
            r"2 feature row\(s\) hold NaN or infinite values \(rows 1, 3\)",
        ),
        (torch.zeros(4, 0), "rows of width 0"),
    ],
)
def test_non_finite_and_empty_features_are_refused_when_read(tmp_path, embeddings, message):
    with pytest.raises(InputError, match=message):
        read_feature_file(feature_file(tmp_path / "f.pkl", embeddings=embeddings))


def test_predict_gives_an_image_with_nan_features_an_error_line(tmp_path, clip_checkpoint, monkeypatch, capsys):
    first, second = save_png(tmp_path / "a.png"), save_png(tmp_path / "b.png", (50, 30))
    forward = ImageEncoder.forward

    def nan_for_the_first(self, pixels):
        features = forward(self, pixels)
        features[0] = float("nan")
        return features

    monkeypatch.setattr(ImageEncoder, "forward", nan_for_the_first)
    code, stderr = run_script("predict", [first, second, "--checkpoint", clip_checkpoint, *PREDICT], capsys)
    assert code == 2 and f"error: {first}: the encoder gave NaN or infinite features" in stderr
    assert "1 of 2 images could not be read" in stderr


# 15: one image id for several files.


def test_an_image_id_shared_by_different_files_is_refused(tmp_path):
    karpathy = {
        "images": [
            {"filename": f"img{n}.jpg", "cocoid": 1, "split": "train", "sentences": [{"raw": "x"}]} for n in range(8)
        ]
    }
    (tmp_path / "k.json").write_text(json.dumps(karpathy))
    with pytest.raises(
        InputError, match=r"7 image\(s\) share an image id with another file, e.g. id 1: img0.jpg and img1.jpg"
    ):
        read_annotations(tmp_path / "k.json", "train")
    coco = {"images": [{"id": 3, "file_name": "a.jpg"}, {"id": 3, "file_name": "b.jpg"}], "annotations": []}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    with pytest.raises(InputError, match="id 3: a.jpg and b.jpg"):
        read_annotations(tmp_path / "c.json")


# 17b, 17c: deep JSON, full disks.


def test_deeply_nested_json_is_one_line(tmp_path):
    (tmp_path / "deep.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(InputError, match="deep.json: JSON nested too deeply"):
        read_json_input(tmp_path / "deep.json", "annotation file")


def test_a_full_disk_is_one_line_naming_the_file_and_keeps_the_previous_one(
    tmp_path, clip_checkpoint, specs, monkeypatch, capsys
):
    features, output = feature_file(tmp_path / "f.pkl", specs["clip"]), tmp_path / "preds.json"
    output.write_text("previous")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("data.atomic.json.dump", full_disk)
    code, stderr = run_script(
        "predict", ["--features", features, "--checkpoint", clip_checkpoint, "--output", output, *PREDICT], capsys
    )
    assert code == 2 and f"error: {output}: cannot write (No space left on device)" in one_error_line(stderr)
    assert output.read_text() == "previous" and sorted(path.name for path in tmp_path.iterdir()) == [
        "f.pkl",
        "preds.json",
    ]


def test_a_full_disk_while_logging_is_one_line(tmp_path, monkeypatch):
    log = StepLog(tmp_path / "log.jsonl", True, None)
    log.handle = type(
        "FullDisk",
        (),
        {"write": lambda self, text: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))},
    )()
    with pytest.raises(InputError, match="log.jsonl: cannot write"):
        log.write(step=1)


# 17e: extraction sizes.


@pytest.mark.parametrize(
    "flags",
    [
        ["--crop_dim", "0"],
        ["--crop_dim", "-1"],
        ["--crop_dim", "13"],
        ["--resize_dim", "0"],
        ["--resize_dim", "20000", "--crop_dim", "20000"],
        ["--crop_dim", "300"],
    ],
)
def test_bad_dinov2_sizes_are_one_line(escaping_set, tiny_dino_dir, tmp_path, flags, capsys):
    argv = extraction_args(escaping_set, tiny_dino_dir, tmp_path / "f.pkl", *flags)
    argv[0] = "--dino_model_type"
    code, stderr = run_script("dino", argv, capsys)
    assert code == 2 and (
        "must be from the model's patch size 14 to 4096" in stderr or "is larger than the resize size" in stderr
    )
    one_error_line(stderr)
    assert not (tmp_path / "f.pkl").exists()


# 18a: temporary files of failed and killed writes.


def test_an_interrupted_write_leaves_no_temporary_and_overwrite_removes_stale_ones(tmp_path, tiny_gpt2_dir, capsys):
    with pytest.raises(KeyboardInterrupt), atomic_write(tmp_path / "x.json", "w") as handle:
        handle.write("half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    stale = [out_dir / ".run_latest.pt.abcd1234.tmp", out_dir / ".run-000.pt.efgh5678.tmp"]
    kept = out_dir / ".other_latest.pt.abcd1234.tmp"  # another run's
    for path in [*stale, kept]:
        path.write_bytes(b"x")
    data = feature_file(tmp_path / "f.pkl")
    argv = ["--data", data, "--out_dir", out_dir, "--prefix", "run", "--gpt2", tiny_gpt2_dir, "--epochs", "1"]
    argv += ["--bs", "4", "--prefix_length", "2", "--cache_dir", tmp_path / "cache", "--overwrite"]
    assert run_script("train", argv, capsys)[0] == 0
    assert not any(path.exists() for path in stale) and kept.exists()


def test_a_directory_replacement_killed_midway_is_tidied_or_undone_by_the_next(tmp_path):
    target = tmp_path / "export"
    # A kill while filling the temporary, and one between moving the old directory aside and renaming the
    # new one in: the target is gone, its content only in the `.old` sibling.
    (tmp_path / ".export.abc123.tmp").mkdir()
    (tmp_path / ".export.abc123.tmp" / "half.bin").write_bytes(b"half")
    aside = tmp_path / ".export.def456.old"
    aside.mkdir()
    (aside / "config.json").write_text("{}")
    with pytest.raises(RuntimeError):
        with atomic_directory(target):
            raise RuntimeError("this run fails too")
    assert (target / "config.json").read_text() == "{}"  # the moved-aside directory is back
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export"]  # and the half-written one is gone
    with atomic_directory(target) as new:
        (new / "config.json").write_text('{"new": true}')
    assert json.loads((target / "config.json").read_text()) == {"new": True}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export"]
