"""train.py end to end on tiny data: learning, checkpoints, exact resume, --only_prefix, DDP, bad input."""

import json
import pickle
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import train
from data.errors import InputError
from data.features import FeatureFile, write_feature_file
from models.captioner import ClipCaptionModel
from models.checkpoint import build_captioner, load_checkpoint
from models.config import CaptionerConfig
from models.decoding import DecodingOptions, caption_features
from models.lm import load_lm, load_tokenizer
from stages.distributed import DistributedContext
from stages.train import Trainer
from stages.train_options import TrainingOptions
from tests.conftest import REPO

CAPTIONS = [
    "a small red circle above a blue square",
    "two green triangles on a white background",
    "a large yellow star next to a black circle",
    "three purple squares in a row on a gray background",
    "an orange triangle below a small pink circle.",
    "a photo of a dog! a cat, sitting on a mat",
    "two people riding bikes",
    "a blue square next to a green triangle",
]
FEATURE_DIM = 16


def write_features(
    path: Path, captions_per_image: list[list[str]], feature_dim: int = FEATURE_DIM, seed: int = 0
) -> Path:
    """A feature file with one random row per image and its captions."""
    embeddings = torch.randn(len(captions_per_image), feature_dim, generator=torch.Generator().manual_seed(seed))
    captions = [
        {"image_id": row, "caption": text, "clip_embedding": row}
        for row, texts in enumerate(captions_per_image)
        for text in texts
    ]
    write_feature_file(path, FeatureFile(embeddings, captions, {"feature_dim": feature_dim}))
    return path


def train_args(data: Path, out_dir: Path, lm_dir: Path, *extra: str) -> list[str]:
    return [
        "--data", str(data), "--out_dir", str(out_dir), "--gpt2", str(lm_dir), "--cache_dir", str(out_dir.parent / "cache"),
        "--prefix_length", "4", "--bs", "4", "--warmup_steps", "2", "--lr", "3e-3", *extra,
    ]  # fmt: skip


def read_log(out_dir: Path, prefix: str = "coco_prefix") -> list[dict]:
    return [json.loads(line) for line in (out_dir / f"{prefix}_log.jsonl").read_text().splitlines()]


def logits_of(model: ClipCaptionModel, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(features, tokens, torch.ones_like(tokens)).logits


def test_overfits_eight_images_and_captions_them(tmp_path, tiny_gpt2_dir):
    data = write_features(tmp_path / "train.pkl", [[text] * 4 for text in CAPTIONS])  # 32 captions, 4 steps an epoch
    val_data = write_features(tmp_path / "val.pkl", [[text] for text in CAPTIONS])  # the same images, once each
    out_dir = tmp_path / "run"
    args = train_args(
        data, out_dir, tiny_gpt2_dir, "--bs", "8", "--epochs", "16", "--save_every", "100", "--lr", "1e-2"
    )
    model = train.main(train.parse_args([*args, "--val_data", str(val_data), "--eval_every", "8"]))

    log = read_log(out_dir)
    losses = [record["loss"] for record in log if "loss" in record]
    val_losses = [record["val_loss"] for record in log if "val_loss" in record]
    assert len(losses) == 16 * 4 and len(val_losses) == 16
    assert sum(losses[-4:]) / 4 < 0.1 * losses[0]
    assert val_losses[-1] < 0.1 * val_losses[0]
    # --eval_every 8 scores epochs 7 and 15; {prefix}_best.pt is the best CIDEr of the log.
    scored = {record["epoch"]: record["CIDEr"] for record in log if "CIDEr" in record}
    assert list(scored) == [7, 15]
    best = torch.load(out_dir / "coco_prefix_best.pt", weights_only=True)
    assert best["epoch"] == max(scored, key=lambda epoch: (scored[epoch], -epoch))
    assert best["scores"]["CIDEr"] == max(scored.values()) > 1.0
    # {prefix}_best_loss.pt: the epoch of the lowest validation loss.
    best_loss = torch.load(out_dir / "coco_prefix_best_loss.pt", weights_only=True)
    assert best_loss["scores"]["val_loss"] == min(val_losses)
    assert best_loss["epoch"] == val_losses.index(min(val_losses))

    tokenizer = load_tokenizer(str(tiny_gpt2_dir))
    features = torch.randn(8, FEATURE_DIM, generator=torch.Generator().manual_seed(0))  # the file's rows
    decoded = caption_features(model, tokenizer, features, DecodingOptions(method="greedy", max_length=24))
    assert [captions[0] for captions in decoded] == CAPTIONS

    # The last epoch's checkpoint rebuilds the same model from its config alone.
    assert sorted(path.name for path in out_dir.glob("*.pt")) == [
        "coco_prefix-000.pt",
        "coco_prefix-015.pt",
        "coco_prefix_best.pt",
        "coco_prefix_best_loss.pt",
        "coco_prefix_latest.pt",
    ]
    tokens = torch.randint(0, 100, (8, 6), generator=torch.Generator().manual_seed(1))
    loaded = load_checkpoint(out_dir / "coco_prefix-015.pt")
    assert torch.equal(logits_of(loaded, features, tokens), logits_of(model, features, tokens))


class Interrupted(Exception):
    """Stands for a crash or a killed job in the middle of training."""


def crash_at_step(monkeypatch, trainer_class: type, step: int, argv: list[str], script: ModuleType = train) -> None:
    """Run `script` (train.py, or train_clip.py with its trainer) with `argv` and stop it (Interrupted) as its
    step `step` begins, as a killed job stops."""
    original_step, calls = trainer_class.train_step, []

    def crashing_step(self, *args):
        calls.append(args)
        if len(calls) == step:
            raise Interrupted
        return original_step(self, *args)

    monkeypatch.setattr(trainer_class, "train_step", crashing_step)
    with pytest.raises(Interrupted):
        script.main(script.parse_args(argv))
    monkeypatch.undo()


def test_resume_reaches_the_weights_of_an_uninterrupted_run(tmp_path, tiny_gpt2_dir, monkeypatch):
    # 12 captions at batch 4: 3 steps an epoch; dropout is on (full fine-tuning), so RNG state matters too.
    data = write_features(
        tmp_path / "train.pkl",
        [[text, CAPTIONS[(row + 3) % 8]] if row < 4 else [text] for row, text in enumerate(CAPTIONS)],
    )
    common = ("--epochs", "2", "--save_latest_every", "2")
    train.main(train.parse_args(train_args(data, tmp_path / "straight", tiny_gpt2_dir, *common)))

    interrupted = tmp_path / "interrupted"
    crash_at_step(monkeypatch, Trainer, 6, train_args(data, interrupted, tiny_gpt2_dir, *common))
    resume_point = torch.load(interrupted / "coco_prefix_latest.pt", weights_only=True)["position"]
    assert (resume_point["step"], resume_point["epoch"], resume_point["batch_in_epoch"]) == (4, 1, 1)  # mid-epoch

    model = train.main(
        train.parse_args(train_args(data, interrupted, tiny_gpt2_dir, *common, "--resume", str(interrupted)))
    )
    for name in ("coco_prefix-001.pt", "coco_prefix_latest.pt"):
        expected = torch.load(tmp_path / "straight" / name, weights_only=True)["model"]
        resumed = torch.load(interrupted / name, weights_only=True)["model"]
        assert expected.keys() == resumed.keys()
        assert all(torch.equal(expected[key], resumed[key]) for key in expected), name
    assert [record["step"] for record in read_log(interrupted) if "loss" in record] == [1, 2, 3, 4, 5, 6]
    assert [record["loss"] for record in read_log(interrupted)] == [
        record["loss"] for record in read_log(tmp_path / "straight")
    ]
    assert all(not parameter.grad.isnan().any() for parameter in model.parameters() if parameter.grad is not None)


def test_best_loss_model_survives_resume_and_overwrite(tmp_path, tiny_gpt2_dir, monkeypatch):
    data = write_features(tmp_path / "train.pkl", [CAPTIONS[:4]])  # 1 step an epoch
    val_data = write_features(tmp_path / "val.pkl", [CAPTIONS[4:]])
    scripted = {0: 2.0, 1: 1.0, 2: 3.0}  # the validation loss of each epoch: the best is epoch 1's
    monkeypatch.setattr(Trainer, "validation_loss", lambda self: scripted[self.position.epoch - 1])
    original_epoch = Trainer.train_epoch

    def crash_in_epoch_two(self, epoch):
        if epoch == 2:
            raise Interrupted
        original_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", crash_in_epoch_two)
    out_dir = tmp_path / "run"
    args = train_args(data, out_dir, tiny_gpt2_dir, "--epochs", "3", "--only_prefix", "--val_data", str(val_data))
    with pytest.raises(Interrupted):
        train.main(train.parse_args(args))
    monkeypatch.setattr(Trainer, "train_epoch", original_epoch)
    train.main(train.parse_args([*args, "--resume", str(out_dir)]))  # epoch 2's worse loss must not replace it
    best_loss = torch.load(out_dir / "coco_prefix_best_loss.pt", weights_only=True)
    assert (best_loss["epoch"], best_loss["scores"]) == (1, {"val_loss": 1.0})
    assert torch.load(out_dir / "coco_prefix_latest.pt", weights_only=True)["position"]["best"]["val_loss"] == 1.0
    assert [record["val_loss"] for record in read_log(out_dir) if "val_loss" in record] == [2.0, 1.0, 3.0]

    # An input that is the run's best-loss file is refused; --overwrite deletes it with the rest.
    replaced = [*args[: args.index("--val_data")], "--val_data", str(out_dir / "coco_prefix_best_loss.pt")]
    with pytest.raises(InputError, match="coco_prefix_best_loss.pt is the same file as --val_data"):
        train.main(train.parse_args([*replaced, "--overwrite"]))
    train.main(train.parse_args([*train_args(data, out_dir, tiny_gpt2_dir, "--epochs", "1"), "--overwrite"]))
    assert not (out_dir / "coco_prefix_best_loss.pt").exists()


def test_a_nan_validation_loss_never_becomes_the_best(tmp_path, tiny_gpt2_dir, monkeypatch):
    data = write_features(tmp_path / "train.pkl", [CAPTIONS[:4]])  # 1 step an epoch
    val_data = write_features(tmp_path / "val.pkl", [CAPTIONS[4:]])
    scripted = {0: 2.0, 1: float("nan"), 2: 3.0}  # an overflowing validation pass in epoch 1
    monkeypatch.setattr(Trainer, "validation_loss", lambda self: scripted[self.position.epoch - 1])
    out_dir = tmp_path / "run"
    args = train_args(data, out_dir, tiny_gpt2_dir, "--epochs", "3", "--only_prefix", "--val_data", str(val_data))
    train.main(train.parse_args(args))
    best_loss = torch.load(out_dir / "coco_prefix_best_loss.pt", weights_only=True)
    assert (best_loss["epoch"], best_loss["scores"]) == (0, {"val_loss": 2.0})


def test_only_prefix_keeps_the_lm_untouched_and_out_of_checkpoints(tmp_path, tiny_gpt2_dir):
    # ClipCap's own feature-file layout: a plain pickle of tensors, no meta.
    data = tmp_path / "clipcap_style.pkl"
    rows = torch.randn(4, FEATURE_DIM)
    captions = [{"image_id": 100 + row, "caption": CAPTIONS[row], "clip_embedding": row, "id": row} for row in range(4)]
    data.write_bytes(pickle.dumps({"clip_embedding": rows, "captions": captions}))
    out_dir = tmp_path / "run"
    model = train.main(
        train.parse_args(
            train_args(
                data,
                out_dir,
                tiny_gpt2_dir,
                "--only_prefix",
                "--epochs",
                "2",
                "--mapping_type",
                "transformer",
                "--num_layers",
                "1",
            )
        )
    )

    pristine = load_lm(str(tiny_gpt2_dir)).state_dict()
    for name, parameter in model.gpt.named_parameters():
        assert torch.equal(parameter, pristine[name]), name
        assert parameter.grad is None and not parameter.requires_grad
    assert not model.gpt.training
    saved = torch.load(out_dir / "coco_prefix-001.pt", weights_only=True)
    assert saved["model"] and not any(name.startswith("gpt.") for name in saved["model"])
    first_epoch = torch.load(out_dir / "coco_prefix-000.pt", weights_only=True)["model"]
    assert not torch.equal(first_epoch["clip_project.linear.weight"], saved["model"]["clip_project.linear.weight"])
    assert json.loads((out_dir / "coco_prefix.json").read_text())["lm_in_checkpoint"] is False
    tokens = torch.randint(0, 100, (4, 5))
    assert torch.equal(
        logits_of(load_checkpoint(out_dir / "coco_prefix-001.pt"), rows, tokens), logits_of(model, rows, tokens)
    )


def test_torchrun_ddp_matches_one_process(tmp_path, tiny_gpt2_dir):
    # One caption text for all: equal token counts, so the mean of two ranks' means is the global mean;
    # --only_prefix: no dropout anywhere, so the two runs see the same arithmetic up to summation order.
    data = write_features(tmp_path / "train.pkl", [[CAPTIONS[0]]] * 8)
    common = ("--only_prefix", "--epochs", "2", "--lr", "1e-2")
    single = train.main(train.parse_args([*train_args(data, tmp_path / "single", tiny_gpt2_dir, *common), "--bs", "4"]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py"]
    result = subprocess.run(
        [*command, *train_args(data, tmp_path / "ddp", tiny_gpt2_dir, *common), "--bs", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = read_log(tmp_path / "ddp")
    assert [record["step"] for record in log if "loss" in record] == [1, 2, 3, 4]  # written once, by rank 0
    ddp = load_checkpoint(tmp_path / "ddp" / "coco_prefix-001.pt")
    for name, parameter in single.clip_project.state_dict().items():
        torch.testing.assert_close(ddp.clip_project.state_dict()[name], parameter, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"clip_embedding": torch.zeros(2, 4)}, "missing key(s) 'captions'"),
        (
            {"clip_embedding": torch.zeros(2, 4), "captions": [{"image_id": 1, "caption": "a", "clip_embedding": 5}]},
            "row index 5",
        ),
        ({"clip_embedding": torch.zeros(2, 4), "captions": []}, "'captions' is empty"),
    ],
)
def test_bad_feature_files_are_one_line_errors(tmp_path, tiny_gpt2_dir, content, message):
    data = tmp_path / "bad.pkl"
    data.write_bytes(pickle.dumps(content))
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train.main(train.parse_args(train_args(data, tmp_path / "run", tiny_gpt2_dir)))


def test_bad_input_exits_with_one_line(tmp_path, tiny_gpt2_dir):
    data = write_features(tmp_path / "train.pkl", [CAPTIONS[:2]])
    args = train_args(data, tmp_path / "run", tiny_gpt2_dir, "--dino_feature_dim", "768")
    result = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: --dino_feature_dim 768, but {data} holds 16-d features"]


def test_existing_run_needs_resume_or_overwrite_and_resume_checks_the_width(tmp_path, tiny_gpt2_dir):
    data = write_features(tmp_path / "train.pkl", [CAPTIONS[:2], CAPTIONS[2:4]])
    out_dir = tmp_path / "run"
    train.main(train.parse_args(train_args(data, out_dir, tiny_gpt2_dir, "--epochs", "1")))
    with pytest.raises(InputError, match="already holds run 'coco_prefix'.*--resume.*--overwrite"):
        train.main(train.parse_args(train_args(data, out_dir, tiny_gpt2_dir, "--epochs", "1")))
    wider = write_features(tmp_path / "wider.pkl", [CAPTIONS[:2], CAPTIONS[2:4]], feature_dim=32)
    with pytest.raises(InputError, match="32-d features, but the run .* was trained on 16-d features"):
        train.main(
            train.parse_args(train_args(wider, out_dir, tiny_gpt2_dir, "--epochs", "1", "--resume", str(out_dir)))
        )
    moved = write_features(tmp_path / "moved.pkl", [CAPTIONS[:2], CAPTIONS[2:4]], seed=7)  # same captions
    with pytest.raises(InputError, match="--data is not the feature file the saved run trained on"):
        train.main(
            train.parse_args(train_args(moved, out_dir, tiny_gpt2_dir, "--epochs", "1", "--resume", str(out_dir)))
        )
    with pytest.raises(InputError, match="lr is 0.1 here but 0.003"):
        train.main(
            train.parse_args(
                [*train_args(data, out_dir, tiny_gpt2_dir, "--epochs", "1", "--resume", str(out_dir)), "--lr", "0.1"]
            )
        )
    # --overwrite with a bad input fails before it deletes anything.
    files = sorted(out_dir.iterdir())
    for bad in (["--data", str(tmp_path / "missing.pkl")], ["--bs", "0"], ["--gpt2", str(tmp_path / "no_lm")]):
        with pytest.raises(InputError):
            train.main(
                train.parse_args([*train_args(data, out_dir, tiny_gpt2_dir, "--epochs", "1", "--overwrite"), *bad])
            )
        assert sorted(out_dir.iterdir()) == files
    train.main(train.parse_args(train_args(data, out_dir, tiny_gpt2_dir, "--epochs", "1", "--overwrite")))
    assert len(read_log(out_dir)) == 1  # the old run's log is gone, not appended to


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--bs", "0", "--bs 0: must be at least 1"),
        ("--epochs", "0", "--epochs 0: must be at least 1"),
        ("--save_every", "0", "--save_every 0: must be at least 1"),
        ("--prefix_length", "0", "--prefix_length 0: must be at least 1"),
        ("--num_workers", "-1", "--num_workers -1: must be at least 0"),
        ("--lr", "0", "--lr 0.0: must be positive"),
    ],
)
def test_out_of_range_flags_are_one_line(tmp_path, tiny_gpt2_dir, flag, value, message):
    args = train.parse_args([*train_args(tmp_path / "missing.pkl", tmp_path / "run", tiny_gpt2_dir), flag, value])
    with pytest.raises(InputError, match=message):
        train.main(args)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_gpt2_dir, monkeypatch):
    data = write_features(tmp_path / "train.pkl", [CAPTIONS[:4], CAPTIONS[4:]])  # 2 steps an epoch
    original_forward, calls = ClipCaptionModel.forward, []

    def nan_from_step_four(self, *args, **kwargs):
        output = original_forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) >= 4:
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(ClipCaptionModel, "forward", nan_from_step_four)
    out_dir = tmp_path / "run"
    with pytest.raises(
        InputError, match=r"loss is nan at step 4 \(epoch 1\).*last good checkpoint is .*coco_prefix_latest.pt"
    ):
        train.main(
            train.parse_args(train_args(data, out_dir, tiny_gpt2_dir, "--epochs", "3", "--save_latest_every", "1"))
        )
    latest = torch.load(out_dir / "coco_prefix_latest.pt", weights_only=True)
    assert latest["position"]["step"] == 3
    assert all(tensor.isfinite().all() for tensor in latest["model"].values() if tensor.is_floating_point())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed precision needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cuda(tmp_path, tiny_gpt2_dir, precision):
    data = write_features(tmp_path / "train.pkl", [[text] * 2 for text in CAPTIONS])
    out_dir = tmp_path / "run"
    args = train_args(data, out_dir, tiny_gpt2_dir, "--epochs", "3", "--device", "cuda", "--precision", precision)
    train.main(train.parse_args(args))
    losses = [record["loss"] for record in read_log(out_dir)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert load_checkpoint(out_dir / "coco_prefix-002.pt").clip_project.model[0].weight.dtype == torch.float32


def test_teacher_forced_pass_builds_no_key_value_cache(tiny_gpt2_dir):
    config = CaptionerConfig(feature_dim=FEATURE_DIM, prefix_length=4, lm_name=str(tiny_gpt2_dir))
    model = build_captioner(config)
    outputs = []
    model.gpt.register_forward_hook(lambda module, args, output: outputs.append(output))
    tokens = torch.randint(0, 100, (2, 5))
    model(torch.randn(2, FEATURE_DIM), tokens, torch.ones_like(tokens))
    assert outputs[0].past_key_values is None  # a cache no teacher-forced step reads would cost time and memory


def test_adamw_epsilon_is_clipcaps(tmp_path, tiny_gpt2_dir):
    data = write_features(tmp_path / "train.pkl", [CAPTIONS[:2]])
    options = TrainingOptions(**vars(train.parse_args(train_args(data, tmp_path / "run", tiny_gpt2_dir))))
    trainer = Trainer(options, DistributedContext(), torch.device("cpu"))
    assert trainer.optimizer.defaults["eps"] == 1e-6


def test_a_run_saved_before_an_option_existed_resumes_with_its_default(tmp_path, tiny_gpt2_dir, monkeypatch):
    """A _latest.pt whose options lack one added later (e.g. --noise_std) ran with that option's default."""
    data = write_features(tmp_path / "train.pkl", [[text] for text in CAPTIONS])
    out_dir = tmp_path / "run"
    argv = train_args(data, out_dir, tiny_gpt2_dir, "--epochs", "2", "--save_latest_every", "1")
    crash_at_step(monkeypatch, Trainer, 3, argv)  # in the second epoch (2 steps an epoch)
    latest = out_dir / "coco_prefix_latest.pt"
    saved = torch.load(latest, weights_only=True)
    del saved["options"]["noise_std"]
    torch.save(saved, latest)
    train.main(train.parse_args([*argv, "--resume", str(out_dir)]))
    assert (out_dir / "coco_prefix-001.pt").is_file()
    saved["options"]["noise_std"] = 0.1  # a value other than this run's is still refused
    torch.save(saved, latest)
    with pytest.raises(InputError, match="noise_std is 0.0 here but 0.1 in the saved run"):
        train.main(train.parse_args([*argv, "--resume", str(out_dir)]))
