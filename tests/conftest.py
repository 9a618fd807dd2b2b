"""Shared fixtures: tiny models built from configs, saved once per session, loaded by path."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub in tests
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# Tiny models: a second intra-op thread only adds waiting (scripts run as subprocesses keep theirs).
torch.set_num_threads(1)

from data.annotations import read_annotations  # noqa: E402
from data.synthetic import generate_dataset  # noqa: E402
from models import quiet_transformers  # noqa: E402
from models.tiny import save_tiny_clip, save_tiny_clip_model, save_tiny_dinov2, save_tiny_gpt2  # noqa: E402

quiet_transformers()  # as every script does before its main(), which the tests call in-process

# Words of the captions the tests use, so the tiny tokenizer knows them all.
TOKENIZER_TEXTS = [
    "a small red circle above a blue square",
    "two green triangles on a white background",
    "a large yellow star next to a black circle",
    "three purple squares in a row on a gray background",
    "an orange triangle below a small pink circle.",
    "a photo of a dog! a cat, sitting on a mat; two people riding bikes",
] * 4


def run_torchrun(command: list[str], processes: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """`command` (a script and its flags, or --no-python and a program) under torchrun: `processes` CPU
    processes (gloo) on this machine, from the repository root, their output captured."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    return subprocess.run([*launcher, *command], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A 2-layer CLIP vision tower (224 px, patch 32, 32-d projection)."""
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def tiny_dino_dir(tmp_path_factory) -> Path:
    """A 2-layer DINOv2 backbone (patch 14, 32-d)."""
    return save_tiny_dinov2(tmp_path_factory.mktemp("tiny_dino"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide GPT-2 with a byte-level BPE trained on TOKENIZER_TEXTS."""
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"), TOKENIZER_TEXTS)


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> dict[str, Path]:
    """Stage 0's (test_train_clip*.py): a small synthetic set (64-pixel images), a whole tiny CLIP (text
    tower included) and a tiny GPT-2."""
    root = tmp_path_factory.mktemp("align")
    dataset = generate_dataset(root / "synthetic", num_train=24, num_val=8, num_test=4, image_size=64, progress=False)
    captions = [
        caption
        for split in ("train", "val")
        for record in read_annotations(dataset, split)
        for caption in record.captions
    ]
    clip = save_tiny_clip_model(root / "clip", captions, image_size=32, patch_size=16, projection_dim=16)
    gpt2 = save_tiny_gpt2(root / "gpt2", captions)
    return {"root": root, "dataset": dataset, "images": dataset.parent, "clip": clip, "gpt2": gpt2}
