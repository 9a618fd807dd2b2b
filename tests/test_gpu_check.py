"""bench/gpu_check.sh: one line and exit 1 without CUDA; reports written after every section."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without CUDA")
def test_without_cuda_it_says_so_in_one_line(tmp_path):
    result = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--quick", "--out_dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["gpu_check: no CUDA device here; run it on a machine with an NVIDIA GPU"]
    assert not list(tmp_path.iterdir())


def test_sections_fit_their_budget_and_reports_follow_each_section(tmp_path):
    for quick, budget in ((True, 150), (False, 420)):  # 2.5 and 7 minutes: one device call of under 8
        assert sum(limit for _, _, limit in gpu_check.sections(quick)) <= budget
    finished = gpu_check.run_section("ok", [sys.executable, "-c", "print('figure 1')"], 30)
    stopped = gpu_check.run_section("slow", [sys.executable, "-c", "import time; time.sleep(5)"], 1)
    gpu_check.write_reports(tmp_path, "a test device", [finished])
    assert json.loads((tmp_path / "gpu_check.json").read_text())["sections"][0]["output"] == ["figure 1"]
    gpu_check.write_reports(tmp_path, "a test device", [finished, stopped])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [section["rc"] for section in report["sections"]] == [0, 124]
    assert "| slow | 124 |" in (tmp_path / "gpu_check.md").read_text()


# The GPU machine's packages: torch and transformers, but no webdataset, pycocoevalcap or wandb.
ABSENT_ON_THE_GPU_MACHINE = ("webdataset", "pycocoevalcap", "wandb")


def test_the_user_path_runs_with_the_gpu_machines_packages(tmp_path):
    blockers = tmp_path / "blockers"  # first on the path: importing them fails, as where they are missing
    blockers.mkdir()
    for name in ABSENT_ON_THE_GPU_MACHINE:
        (blockers / f"{name}.py").write_text(f"raise ImportError('{name} is not installed')\n")
    result = subprocess.run(
        [sys.executable, "bench/bench_pipeline.py", "--device", "cpu", "--tiny", "--num_images", "6"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(blockers)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    stages = json.loads(result.stdout.strip().splitlines()[-1])
    assert [stage["stage"].split()[0] for stage in stages] == ["parse_coco_clip.py", "train.py", "predict.py", "evaluate.py"]
    assert all(stage["seconds"] > 0 and stage["peak_gpu_mib"] == 0 for stage in stages[:3])
    assert stages[3] == {"stage": "evaluate.py (test split)", "skipped": "pycocoevalcap is not installed"}
