"""train_clip.py under torchrun (2 CPU processes, gloo). The InfoNCE batch is both processes' batches
together, so a run with 4 pairs per process takes the steps one process takes with 8 on the same data
(the tiny CLIP vision tower: no BatchNorm, whose statistics stay per process); rank 0 alone logs and writes;
an unreadable image on one rank leaves the ranks with unequal batches and stalls neither; an image repeated
to pad the epoch counts once; --resume continues."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import train_clip
from data.synthetic import DATASET_FILE
from models.encoders import load_encoder
from tests.conftest import run_torchrun
from tests.test_train_clip import RECALL_NAMES, align_args, read_log

# train_clip.py stopped at the start of its second epoch, as a job killed between epochs.
STOPPED_IN_EPOCH_ONE = """
import sys
import train_clip
from stages.train_clip import AlignmentTrainer
original = AlignmentTrainer.train_epoch
def train_epoch(self, epoch):
    if epoch == 1:
        raise SystemExit(3)
    original(self, epoch)
AlignmentTrainer.train_epoch = train_epoch
train_clip.main(train_clip.parse_args(sys.argv[1:]))
"""


@pytest.fixture
def broken_images(synthetic, tmp_path) -> tuple[Path, Path]:
    """(images_dir, the unreadable image): the synthetic images with one training image not an image."""
    images = tmp_path / "images"
    shutil.copytree(synthetic["images"], images)
    dataset = json.loads(synthetic["dataset"].read_text())
    train_image = next(image for image in dataset["images"] if image["split"] == "train")
    broken = images / train_image["filepath"] / train_image["filename"]
    broken.write_bytes(b"not a jpeg")
    return images, broken


def clip_tower_args(
    synthetic: dict, images: Path, out_dir: Path, *extra: str, dataset: Path | None = None
) -> list[str]:
    """align_args with the tiny CLIP vision tower (and a run-local text cache)."""
    args = align_args(synthetic, out_dir, "--cache_dir", str(out_dir.parent / "cache"), *extra, dataset=dataset)
    args[args.index("--images_dir") + 1] = str(images)
    args[args.index("--image_encoder") + 1] = str(synthetic["clip"])
    return args


def assert_same_steps(ddp_dir: Path, single_dir: Path, broken: Path | None, steps: int = 6) -> None:
    """The two runs' losses, temperatures, recalls and weights agree; each wrote its files once."""
    ddp_log, single_log = read_log(ddp_dir), read_log(single_dir)
    assert [record["step"] for record in ddp_log if "loss" in record] == list(range(1, steps + 1))  # rank 0's alone
    for ddp, single in zip(ddp_log, single_log, strict=True):
        assert ddp.keys() == single.keys() and ddp["step"] == single["step"]
        for name in ("loss", "logit_scale", *RECALL_NAMES):
            if name in ddp:
                assert ddp[name] == pytest.approx(single[name], rel=1e-5), (name, ddp, single)
    ddp_retrieval = json.loads((ddp_dir / "retrieval.json").read_text())
    single_retrieval = json.loads((single_dir / "retrieval.json").read_text())
    assert [record["epoch"] for record in ddp_retrieval["epochs"]] == [0, 1]
    assert ddp_retrieval["best"]["epoch"] == single_retrieval["best"]["epoch"]
    ddp_weights = torch.load(ddp_dir / "align_latest.pt", weights_only=True)["model"]
    single_weights = torch.load(single_dir / "align_latest.pt", weights_only=True)["model"]
    for name, tensor in single_weights.items():
        torch.testing.assert_close(ddp_weights[name], tensor, rtol=1e-3, atol=1e-3)
    encoder, _ = load_encoder(str(ddp_dir / "encoder"))
    assert encoder.spec.family == "aligned" and encoder.spec.feature_dim == 16
    kept_epoch = json.loads((ddp_dir / "encoder" / "config.json").read_text())["source"]["epoch"]
    assert kept_epoch == ddp_retrieval["best"]["epoch"]
    skipped = ddp_dir / "skipped_images.json"
    assert list(json.loads(skipped.read_text())) == [str(broken)] if broken else not skipped.exists()


def test_torchrun_trained_text_tower_takes_the_steps_of_one_process_at_twice_the_batch(
    synthetic,
    broken_images,
    tmp_path,
):
    images, broken = broken_images
    ddp_args = clip_tower_args(synthetic, images, tmp_path / "ddp", "--train_text", "--bs", "4")
    result = run_torchrun(["train_clip.py", *ddp_args])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("config:") == 1 and "world_size: 2" in result.stdout
    train_clip.main(train_clip.parse_args(clip_tower_args(synthetic, images, tmp_path / "single", "--train_text")))
    assert_same_steps(tmp_path / "ddp", tmp_path / "single", broken)


def test_torchrun_resumes_with_frozen_text_to_the_steps_of_one_process_at_twice_the_batch(
    synthetic,
    broken_images,
    tmp_path,
):
    images, broken = broken_images
    ddp_args = clip_tower_args(synthetic, images, tmp_path / "ddp", "--bs", "4")
    stopped = run_torchrun(["--no-python", sys.executable, "-c", STOPPED_IN_EPOCH_ONE, *ddp_args])
    assert stopped.returncode != 0 and "SystemExit" not in stopped.stdout
    validated = json.loads((tmp_path / "ddp" / "retrieval.json").read_text())["epochs"]
    assert [record["epoch"] for record in validated] == [0]  # stopped after the first epoch's checkpoint
    assert stopped.stdout.count("embedded 120 captions") == 1  # by rank 0, into the cache the other rank read
    resumed = run_torchrun(["train_clip.py", *ddp_args, "--resume", str(tmp_path / "ddp")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "embedded" not in resumed.stdout  # every caption embedding came from the cache
    train_clip.main(train_clip.parse_args(clip_tower_args(synthetic, images, tmp_path / "single")))
    assert_same_steps(tmp_path / "ddp", tmp_path / "single", broken)


def test_torchrun_counts_an_image_repeated_to_pad_the_epoch_once(synthetic, tmp_path):
    """23 training images over 2 processes: DistributedSampler repeats one so that each takes 12, and at
    --bs 12 the image meets its copy in the one InfoNCE batch of the epoch, where the copy would be its
    own negative. Left out, the step is one process's on the 23 images."""
    dataset = json.loads(synthetic["dataset"].read_text())
    next(image for image in dataset["images"] if image["split"] == "train")["split"] = "restval"
    odd = tmp_path / DATASET_FILE
    odd.write_text(json.dumps(dataset))
    ddp_args = clip_tower_args(synthetic, synthetic["images"], tmp_path / "ddp", "--bs", "12", dataset=odd)
    result = run_torchrun(["train_clip.py", *ddp_args])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train_images: 23" in result.stdout and "steps_per_epoch: 1" in result.stdout
    single_args = clip_tower_args(synthetic, synthetic["images"], tmp_path / "single", "--bs", "24", dataset=odd)
    train_clip.main(train_clip.parse_args(single_args))
    assert_same_steps(tmp_path / "ddp", tmp_path / "single", broken=None, steps=2)
