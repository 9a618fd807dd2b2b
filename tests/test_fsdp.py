"""train.py --fsdp under torchrun (2 CPU processes, gloo): the LM's blocks and the rest sharded with FSDP2.
Two sharded processes at --bs 2 take the steps of one plain process at --bs 4 (tiny GPT-2 and Llama, full
fine-tune); their checkpoints are ordinary ones (load_checkpoint, export); --resume continues exactly; the flags
it does not take are one line. Each torchrun start costs seconds, so each run is checked for several things."""

import json
import sys
from pathlib import Path

import pytest
import torch

import train
from data.errors import InputError
from models.checkpoint import load_checkpoint
from models.decoding import DecodingOptions, caption_features
from models.hf_export import load_captioner
from models.lm import lm_blocks, load_lm, load_tokenizer
from models.tiny import TINY_LM_SIZES, save_tiny_causal_lm
from tests.conftest import TOKENIZER_TEXTS, run_torchrun
from tests.test_training import CAPTIONS, FEATURE_DIM, read_log, train_args, write_features

# Two captions of the same token count (checked below), so each rank's mean loss over its tokens, averaged
# over the ranks, is the mean over the whole batch's tokens that one process takes.
TEXTS = (CAPTIONS[0], CAPTIONS[7])
# 8 images, 12 captions: 3 steps an epoch at 4 a step (2 per rank); 5 validation captions, 3 + 2 over the
# ranks: 2 batches on rank 0, 1 on rank 1.
COMMON = ("--epochs", "3", "--save_latest_every", "2")
# train.py stopped as its step 5 begins (mid-epoch 1, after the step-4 _latest.pt), as a job killed there.
STOPPED_AT_STEP_FIVE = """
import sys
import train
from stages.train import Trainer
original = Trainer.train_step
def train_step(self, batch, epoch):
    if self.position.step == 4:
        raise SystemExit(3)
    return original(self, batch, epoch)
Trainer.train_step = train_step
train.main(train.parse_args(sys.argv[1:]))
"""


def dropout_free_lm(directory: Path, family: str) -> Path:
    """A tiny LM of `family` with every dropout at 0: the ranks draw other masks than one process would."""
    save_tiny_causal_lm(directory, family, TOKENIZER_TEXTS)
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    config.update({key: 0.0 for key in config if key.endswith(("dropout", "pdrop"))})
    config_file.write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp_data")
    captions = [[TEXTS[row % 2]] * (2 if row < 4 else 1) for row in range(8)]
    return {
        "train": write_features(root / "train.pkl", captions),
        "val": write_features(root / "val.pkl", [[TEXTS[row % 2]] for row in range(5)], seed=1),
    }


def run_args(data: dict[str, Path], out_dir: Path, lm_dir: Path, batch_size: int, *extra: str) -> list[str]:
    """train_args for a full fine-tune with validation and an export, `batch_size` captions per process."""
    export = ["--export_hf", str(out_dir.parent / f"{out_dir.name}_export")]
    return [*train_args(data["train"], out_dir, lm_dir, *COMMON, "--val_data", str(data["val"]), *export, *extra),
            "--bs", str(batch_size)]  # fmt: skip


def captions_of(model_path: Path, lm_dir: Path) -> list[str]:
    """Greedy captions of the training file's 8 rows."""
    features = torch.randn(8, FEATURE_DIM, generator=torch.Generator().manual_seed(0))
    model = load_captioner(model_path)
    decoded = caption_features(model, load_tokenizer(str(lm_dir)), features, DecodingOptions("greedy", max_length=12))
    return [texts[0] for texts in decoded]


@pytest.mark.parametrize("family", sorted(TINY_LM_SIZES))
def test_the_blocks_sharded_are_the_lms_decoder_layers(tmp_path, family):
    lm = load_lm(str(save_tiny_causal_lm(tmp_path, family, TOKENIZER_TEXTS)))
    blocks = lm_blocks(lm)
    # transformers' own list of the modules that must stay whole (what accelerate splits a model by)
    assert len(blocks) == 2 and {type(block).__name__ for block in blocks} == set(lm._no_split_modules)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_two_sharded_processes_take_the_steps_of_one_at_twice_the_batch(tmp_path, data, family):
    lm_dir = dropout_free_lm(tmp_path / family, family)
    tokenizer = load_tokenizer(str(lm_dir))
    assert len({len(tokenizer(text)["input_ids"]) for text in TEXTS}) == 1
    single_dir, fsdp_dir = tmp_path / "single", tmp_path / "fsdp"
    train.main(train.parse_args(run_args(data, single_dir, lm_dir, 4)))
    result = run_torchrun(["train.py", *run_args(data, fsdp_dir, lm_dir, 2, "--fsdp")])
    assert result.returncode == 0, result.stderr[-3000:]

    single_log, fsdp_log = read_log(single_dir), read_log(fsdp_dir)
    assert [record["step"] for record in fsdp_log if "loss" in record] == list(range(1, 10))  # rank 0's alone
    for name in ("loss", "val_loss"):  # val_loss: rank 1 ran an uncounted batch to match rank 0's two batches
        fsdp_values = [record[name] for record in fsdp_log if name in record]
        assert fsdp_values == pytest.approx([record[name] for record in single_log if name in record], rel=1e-5)
    # The checkpoints are ordinary ones: the same names and shapes, and the steps' weights up to rounding (the
    # gradient of 4 captions is summed in another order when each rank sums 2 and the ranks' sums are averaged).
    for checkpoint in ("coco_prefix-002.pt", "coco_prefix_best_loss.pt"):
        single = torch.load(single_dir / checkpoint, weights_only=True)["model"]
        sharded = torch.load(fsdp_dir / checkpoint, weights_only=True)["model"]
        assert sharded.keys() == single.keys()
        for name, tensor in single.items():
            torch.testing.assert_close(sharded[name], tensor, rtol=1e-5, atol=1e-6, msg=f"{checkpoint} {name}")
    fsdp_model = load_checkpoint(fsdp_dir / "coco_prefix-002.pt")
    if family == "gpt2":  # GPT-2 ties its head to its token embeddings: the loaded model still does
        assert fsdp_model.gpt.get_input_embeddings().weight is fsdp_model.gpt.get_output_embeddings().weight
    exported = captions_of(tmp_path / "fsdp_export", lm_dir)
    assert exported == captions_of(tmp_path / "single_export", lm_dir)
    assert exported == captions_of(fsdp_dir / "coco_prefix-002.pt", lm_dir)
    assert len(set(exported)) > 1  # the captions depend on the image: agreeing on each says something
    # The resume state keys the optimizer's moments by parameter name, every trained weight's.
    latest = torch.load(fsdp_dir / "coco_prefix_latest.pt", weights_only=True)
    assert set(latest["optimizer"]["state"]) == {name for name, _ in fsdp_model.named_parameters()}
    assert latest["runtime"]["fsdp"] is True


def test_resume_under_fsdp_reaches_the_uninterrupted_runs_weights(tmp_path, data):
    lm_dir = dropout_free_lm(tmp_path / "gpt2", "gpt2")
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    result = run_torchrun(["train.py", *run_args(data, straight, lm_dir, 2, "--fsdp")])
    assert result.returncode == 0, result.stderr[-3000:]
    args = run_args(data, interrupted, lm_dir, 2, "--fsdp")
    stopped = run_torchrun(["--no-python", sys.executable, "-c", STOPPED_AT_STEP_FIVE, *args])
    assert stopped.returncode != 0
    position = torch.load(interrupted / "coco_prefix_latest.pt", weights_only=True)["position"]
    assert (position["step"], position["epoch"], position["batch_in_epoch"]) == (4, 1, 1)

    # Without --fsdp the saved optimizer state (keyed by name) does not fit: one line, before any work.
    with pytest.raises(InputError, match="sharded the model with --fsdp; resume it with --fsdp"):
        train.main(train.parse_args([*(arg for arg in args if arg != "--fsdp"), "--resume", str(interrupted)]))
    resumed = run_torchrun(["train.py", *args, "--resume", str(interrupted)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in ("coco_prefix-002.pt", "coco_prefix_latest.pt"):
        expected = torch.load(straight / name, weights_only=True)
        got = torch.load(interrupted / name, weights_only=True)
        assert expected["model"].keys() == got["model"].keys()
        assert all(torch.equal(expected["model"][key], got["model"][key]) for key in expected["model"]), name
    moments = expected["optimizer"]["state"]
    assert all(
        torch.equal(moments[name][kind], got["optimizer"]["state"][name][kind])
        for name in moments
        for kind in ("exp_avg", "exp_avg_sq")
    )
    figures = [[(record["step"], record.get("loss"), record.get("val_loss")) for record in read_log(run)]
               for run in (interrupted, straight)]  # fmt: skip
    assert figures[0] == figures[1] and len(figures[0]) == 9 + 3  # each step, each epoch's validation, once


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--only_prefix"], "--only_prefix: not with --fsdp"),
        (["--eval_every", "1"], "--eval_every: not with --fsdp"),
        (["--scst", "--init_from", "x.pt"], "--scst: not with --fsdp"),
    ],
)
def test_flags_fsdp_does_not_take_are_one_line(capsys, flags, message):
    with pytest.raises(SystemExit):
        train.parse_args(["--data", "train.pkl", "--fsdp", *flags])
    assert message in capsys.readouterr().err.splitlines()[-1]


def test_fsdp_without_torchrun_is_one_line(tmp_path, data, tiny_gpt2_dir):
    with pytest.raises(InputError, match=r"--fsdp shards the model over torchrun's processes: launch 2 or more"):
        train.main(train.parse_args([*train_args(data["train"], tmp_path / "run", tiny_gpt2_dir), "--fsdp"]))
    assert not (tmp_path / "run" / "coco_prefix_log.jsonl").exists()
