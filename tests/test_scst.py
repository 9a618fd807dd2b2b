"""train.py --scst end to end on tiny models: every reward and baseline, the reward rising, exact resume,
a frozen LM staying frozen, and one-line errors."""

import shutil
import subprocess
import sys

import pytest
import torch

import train
from data.features import FeatureFile, write_feature_file
from data.store import read_features
from models.checkpoint import load_checkpoint
from models.clip_score import ClipScorer
from models.tiny import save_tiny_clip_model
from stages.train import Trainer
from tests.conftest import REPO, TOKENIZER_TEXTS, run_torchrun
from tests.test_training import CAPTIONS, crash_at_step, read_log, train_args, write_features

# train.py --scst with a deterministic sampler: each image's samples are prefixes of the training captions,
# of lengths that differ by image and sample, so the same images give the same samples however they are
# split over ranks, and their CIDEr-D differs (nonzero advantages).
FIXED_SAMPLES = """
import sys
import train
import stages.scst
from models.decoding import Hypothesis
from stages.scst import Scst
from tests.test_training import CAPTIONS
batch = []
scst_loss = Scst.loss
def recording_loss(self, network, images):
    batch[:] = [(self.tokenizer, index) for index in images.indices.tolist()]
    return scst_loss(self, network, images)
def decode(model, conditioning, eos_token_id, options):
    return [
        [Hypothesis(tokenizer(CAPTIONS[(image + k) % len(CAPTIONS)])["input_ids"][: (5 * image + k) % 7 + 1]
                    + [eos_token_id], 0.0, 0.0)
         for k in range(options.num_captions)]
        for tokenizer, image in batch
    ]
Scst.loss = recording_loss
stages.scst.decode = decode
train.main(train.parse_args(sys.argv[1:]))
"""

# Two references per image: the captions of two neighbours, so no single caption is right everywhere.
REFERENCES = [[text, CAPTIONS[(row + 1) % len(CAPTIONS)]] for row, text in enumerate(CAPTIONS)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_features(tmp_path_factory.mktemp("scst_data") / "train.pkl", REFERENCES)


def cross_entropy_checkpoint(out_dir, data, lm_dir, *extra: str):
    """A captioner trained by train.py for 8 epochs on `data`."""
    args = train_args(data, out_dir, lm_dir, "--epochs", "8", "--save_every", "100", "--lr", "1e-2", *extra)
    train.main(train.parse_args(args))
    return out_dir / "coco_prefix-007.pt"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data, tiny_gpt2_dir):
    return cross_entropy_checkpoint(tmp_path_factory.mktemp("ce"), data, tiny_gpt2_dir)


def scst_args(data, checkpoint, out_dir, *extra: str) -> list[str]:
    return [
        "--scst", "--init_from", str(checkpoint), "--data", str(data), "--out_dir", str(out_dir),
        "--prefix", "scst", "--cache_dir", str(out_dir.parent / "cache"), "--bs", "4", "--lr", "5e-3",
        "--scst_samples", "4", "--max_length", "12", *extra,
    ]  # fmt: skip


def test_cider_reward_rises(tmp_path, data, checkpoint):
    train.main(train.parse_args(scst_args(data, checkpoint, tmp_path / "run", "--epochs", "40", "--lr", "1e-3")))
    steps = [record for record in read_log(tmp_path / "run", "scst") if "loss" in record]
    assert len(steps) == 40 * 2  # 8 images at 4 a batch
    assert all({"reward", "baseline", "sample_length", "lr"} <= record.keys() for record in steps)
    assert {record["lr"] for record in steps} == {1e-3}  # constant: no warmup, no decay under --scst
    first, last = (sum(record["reward"] for record in part) / 8 for part in (steps[:8], steps[-8:]))
    assert last > first + 0.1, (first, last)
    assert (tmp_path / "run" / "scst-039.pt").is_file() and (tmp_path / "run" / "scst_latest.pt").is_file()


def test_a_frozen_lm_stays_frozen(tmp_path, data, tiny_gpt2_dir):
    frozen = cross_entropy_checkpoint(tmp_path / "ce", data, tiny_gpt2_dir, "--only_prefix")
    model = train.main(train.parse_args(scst_args(data, frozen, tmp_path / "run", "--epochs", "1")))
    initial = load_checkpoint(frozen)
    assert not model.config.lm_in_checkpoint and model.lm_frozen
    saved = torch.load(tmp_path / "run" / "scst-000.pt", weights_only=True)["model"]
    assert not any(name.startswith("gpt.") for name in saved)
    assert all(torch.equal(a, b) for a, b in zip(model.gpt.parameters(), initial.gpt.parameters(), strict=True))
    assert not all(torch.equal(saved[name], tensor) for name, tensor in initial.state_dict().items() if name in saved)


@pytest.fixture(scope="module")
def clip_features(tmp_path_factory):
    """A tiny whole CLIP and a feature file of its image_embeds for the training images."""
    directory = tmp_path_factory.mktemp("scst_clip")
    scorer = ClipScorer(str(save_tiny_clip_model(directory / "clip", TOKENIZER_TEXTS)))
    embeddings = torch.randn(len(CAPTIONS), scorer.model.config.projection_dim)
    captions = [{"image_id": row, "caption": c, "clip_embedding": row} for row, cs in enumerate(REFERENCES) for c in cs]
    encoder = {"family": "clip", "name": scorer.name, "feature_type": "image_embeds"}
    write_feature_file(directory / "clip.pkl", FeatureFile(embeddings, captions, {"encoder": encoder}))
    return scorer.name, directory / "clip.pkl"


@pytest.mark.parametrize(
    ("reward", "baseline"), [("cider", "greedy"), ("clip", "mean"), ("cider+clip", "greedy")]
)
def test_every_reward_and_baseline_runs(tmp_path, data, checkpoint, clip_features, reward, baseline):
    clip_model, features_file = clip_features
    extra = ("--epochs", "1", "--reward", reward, "--baseline", baseline)
    if "clip" in reward:
        extra += ("--clip_model", clip_model, "--clip_features", str(features_file), "--clip_weight", "0.5")
    train.main(train.parse_args(scst_args(data, checkpoint, tmp_path / "run", *extra)))
    steps = [record for record in read_log(tmp_path / "run", "scst") if "loss" in record]
    assert len(steps) == 2 and all(record["reward"] >= 0 for record in steps)
    if reward == "clip":
        assert all(record["reward"] <= 2.5 for record in steps)  # CLIP-S is at most 2.5


@pytest.mark.parametrize("crash_step", [2, 3])  # killed mid-epoch (saved after step 1), or between epochs
def test_resume_reaches_the_weights_of_an_uninterrupted_run(tmp_path, data, checkpoint, monkeypatch, crash_step):
    common = ("--epochs", "2", "--save_latest_every", "1")
    train.main(train.parse_args(scst_args(data, checkpoint, tmp_path / "straight", *common)))
    interrupted = tmp_path / "interrupted"
    crash_at_step(monkeypatch, Trainer, crash_step, scst_args(data, checkpoint, interrupted, *common))
    resume = ("--resume", str(interrupted))
    train.main(train.parse_args(scst_args(data, checkpoint, interrupted, *common, *resume)))
    expected = torch.load(tmp_path / "straight" / "scst-001.pt", weights_only=True)["model"]
    resumed = torch.load(interrupted / "scst-001.pt", weights_only=True)["model"]
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)
    straight_log = [r["reward"] for r in read_log(tmp_path / "straight", "scst") if "loss" in r]
    assert [r["reward"] for r in read_log(interrupted, "scst") if "loss" in r] == straight_log


def test_resume_with_another_reward_setting_is_refused_in_one_line(
    tmp_path, data, checkpoint, clip_features, monkeypatch, capsys
):
    clip_model, features_file = clip_features
    reward = ("--reward", "cider+clip", "--clip_model", clip_model, "--clip_features", str(features_file))
    common = ("--epochs", "2", "--save_latest_every", "1", *reward, "--clip_weight", "0.5")
    run = tmp_path / "run"
    crash_at_step(monkeypatch, Trainer, 2, scst_args(data, checkpoint, run, *common))  # saved after step 1
    features = read_features(features_file)
    other_clip = shutil.copytree(clip_model, tmp_path / "other_clip")  # another CLIP, and its image_embeds
    encoder = {**features.meta["encoder"], "name": ClipScorer(str(other_clip)).name}
    other_clip_features = tmp_path / "other_clip.pkl"
    write_feature_file(other_clip_features, FeatureFile(features.embeddings, features.captions, {"encoder": encoder}))
    other_embeddings = tmp_path / "other_embeddings.pkl"  # the same CLIP's, other values
    write_feature_file(other_embeddings, FeatureFile(-features.embeddings, features.captions, features.meta))
    capsys.readouterr()
    cases = [
        (("--reward", "cider"), "reward is 'cider' here but 'cider+clip'"),
        (("--clip_weight", "2.0"), "clip_weight is 2.0 here but 0.5"),
        (("--baseline", "greedy"), "baseline is 'greedy' here but 'mean'"),
        (("--scst_samples", "3"), "scst_samples is 3 here but 4"),
        (("--clip_model", str(other_clip), "--clip_features", str(other_clip_features)),
         f"clip_model is {str(other_clip)!r} here but {clip_model!r}"),
        (("--clip_features", str(other_embeddings)), f"clip_features is {str(other_embeddings)!r} here"),
    ]  # fmt: skip
    for changed, message in cases:
        code, err = run_error(capsys, scst_args(data, checkpoint, run, *common, *changed, "--resume", str(run)))
        assert code == 2 and message in err and len(err.splitlines()) == 1, (message, err)
    assert torch.load(run / "scst_latest.pt", weights_only=True)["position"]["step"] == 1  # nothing trained on


def run_error(capsys, argv: list[str]) -> tuple[int, str]:
    """(exit status, stderr) of train.py's command line as __main__ runs it."""
    from data.errors import exit_on_input_error

    with pytest.raises(SystemExit) as exit_info, exit_on_input_error():
        train.main(train.parse_args(argv))
    return exit_info.value.code, capsys.readouterr().err.strip()


def test_errors_are_one_line(tmp_path, data, checkpoint, capsys, clip_features):
    out_dir = tmp_path / "run"
    code, err = run_error(capsys, [*scst_args(data, checkpoint, out_dir), "--prefix_length", "4"])
    assert code == 2 and "--scst takes the model from --init_from's config; do not give --prefix_length" in err
    code, err = run_error(capsys, train_args(data, out_dir, checkpoint, "--reward", "clip"))
    assert code == 2 and err.endswith("--reward: only with --scst or --unpaired")
    without_init = scst_args(data, checkpoint, out_dir)[3:]  # "--scst", "--init_from", PATH dropped
    cases = [
        (["--scst", *without_init], "--scst needs --init_from"),
        (scst_args(data, tmp_path / "missing.pt", out_dir), "missing.pt: checkpoint not found"),
        (scst_args(data, data, out_dir), "cannot read checkpoint"),
        (scst_args(write_features(tmp_path / "wide.pkl", REFERENCES, feature_dim=24), checkpoint, out_dir),
         "has 24-d features, the --init_from checkpoint's mapper expects 16-d"),
        (scst_args(data, checkpoint, out_dir, "--reward", "clip"), "--reward clip needs --clip_model"),
        (scst_args(data, checkpoint, out_dir, "--reward", "clip", "--clip_model", clip_features[0]),
         "does not hold image_embeds of"),
        (scst_args(data, checkpoint, out_dir, "--scst_samples", "1"), "--baseline mean needs --scst_samples of at least 2"),
        (scst_args(data, checkpoint, out_dir, "--max_length", "1000"), "exceeds the LM's 128 positions"),
    ]  # fmt: skip
    for argv, message in cases:
        code, err = run_error(capsys, argv)
        assert code == 2 and message in err and len(err.splitlines()) == 1, (message, err)
    assert not out_dir.exists() or {path.name for path in out_dir.iterdir()} <= {"scst.lock"}  # nothing written


def encoder_features(path, encoder: dict, feature_dim: int = 16):
    """write_features's file of REFERENCES, recording `encoder` as the one that made its features."""
    features = read_features(write_features(path, REFERENCES, feature_dim))
    write_feature_file(path, FeatureFile(features.embeddings, features.captions, {**features.meta, "encoder": encoder}))
    return path


def test_features_of_another_encoder_than_the_checkpoints_are_refused(tmp_path, tiny_gpt2_dir, capsys):
    clip = {"family": "clip", "name": "openai/clip-vit-base-patch32", "feature_type": "image_embeds"}
    dino = {"family": "dinov2", "name": "facebook/dinov2-small", "feature_type": "cls"}
    clip_data = encoder_features(tmp_path / "clip.pkl", clip)
    checkpoint = cross_entropy_checkpoint(tmp_path / "ce", clip_data, tiny_gpt2_dir, "--epochs", "1")
    checkpoint = checkpoint.with_name("coco_prefix-000.pt")  # --epochs 1 overrides its 8
    capsys.readouterr()  # train.py's progress bars
    dino_data = encoder_features(tmp_path / "dino.pkl", dino)  # the same width: only the encoder tells them apart
    expected = f"the --init_from checkpoint {checkpoint} expects clip openai/clip-vit-base-patch32 (image_embeds)"
    out_dir = tmp_path / "run"
    cases = [
        (scst_args(dino_data, checkpoint, out_dir), f"--data {dino_data} holds features of dinov2"),
        (scst_args(clip_data, checkpoint, out_dir, "--val_data", str(dino_data)),
         f"--val_data {dino_data} holds features of dinov2"),
    ]  # fmt: skip
    for argv, source in cases:
        code, err = run_error(capsys, argv)
        assert code == 2 and err.startswith(f"error: {source}") and err.endswith(expected), err
        assert len(err.splitlines()) == 1
    wide = write_features(tmp_path / "wide.pkl", REFERENCES, feature_dim=24)
    code, err = run_error(capsys, scst_args(clip_data, checkpoint, out_dir, "--val_data", str(wide)))
    assert code == 2 and err.endswith(f"has 24-d features, but the --init_from checkpoint {checkpoint} expects 16-d")
    assert not out_dir.exists() or {path.name for path in out_dir.iterdir()} <= {"scst.lock"}


def test_torchrun_takes_the_steps_of_one_process_at_twice_the_batch(tmp_path, data, checkpoint):
    # 8 images: 2 ranks of 2 images a step against 1 process of 4, 2 steps an epoch; the ranks' samples
    # hold unequal numbers of tokens, so dividing by each rank's own count would weigh them wrongly.
    common = ("--epochs", "2", "--lr", "1e-3")
    ddp_args = scst_args(data, checkpoint, tmp_path / "ddp", *common, "--bs", "2")
    ddp = run_torchrun(["--no-python", sys.executable, "-c", FIXED_SAMPLES, *ddp_args])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single_args = scst_args(data, checkpoint, tmp_path / "single", *common, "--bs", "4")
    single = subprocess.run([sys.executable, "-c", FIXED_SAMPLES, *single_args], cwd=REPO, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp_steps = [record for record in read_log(tmp_path / "ddp", "scst") if "loss" in record]
    single_steps = [record for record in read_log(tmp_path / "single", "scst") if "loss" in record]
    assert len(ddp_steps) == len(single_steps) == 4
    for ddp_step, single_step in zip(ddp_steps, single_steps, strict=True):
        assert single_step["loss"] != 0 and single_step["reward"] > 0
        for name in ("loss", "reward", "baseline", "sample_length"):
            assert ddp_step[name] == pytest.approx(single_step[name], rel=1e-5, abs=1e-7), (name, ddp_step, single_step)
    ddp_weights = torch.load(tmp_path / "ddp" / "scst-001.pt", weights_only=True)["model"]
    single_weights = torch.load(tmp_path / "single" / "scst-001.pt", weights_only=True)["model"]
    initial = torch.load(checkpoint, weights_only=True)["model"]
    assert not all(torch.equal(single_weights[name], initial[name]) for name in single_weights)  # they moved
    for name, tensor in single_weights.items():
        torch.testing.assert_close(ddp_weights[name], tensor, rtol=1e-4, atol=1e-6)


def test_torchrun_splits_the_images_and_keeps_the_best_validation_cider(tmp_path, data, checkpoint):
    # 8 images, 2 ranks of 2 images a step: 2 steps an epoch; validation CIDEr after each epoch.
    argv = scst_args(data, checkpoint, tmp_path / "ddp", "--epochs", "2", "--bs", "2", "--lr", "1e-3")
    argv += ["--val_data", str(data), "--eval_every", "1"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py"]
    result = subprocess.run([*command, *argv], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = read_log(tmp_path / "ddp", "scst")
    assert [record["step"] for record in log if "loss" in record] == [1, 2, 3, 4]  # written once, by rank 0
    scores = [record["CIDEr"] for record in log if "CIDEr" in record]
    assert len(scores) == 2
    best = torch.load(tmp_path / "ddp" / "scst_best.pt", weights_only=True)
    assert best["scores"]["CIDEr"] == max(scores)
