"""train.py --unpaired end to end on tiny models (CgT-GAN): the CLIP-agg target and score, the adversarial
reward, lambda_t's schedule, one step moving both players, exact resume, --corpus errors, and no caption of
--data ever read."""

import copy
import math

import pytest
import torch
from transformers import PreTrainedTokenizerBase

import stages.unpaired
import train
from data.features import FeatureFile, write_feature_file
from data.store import read_features
from models.clip_score import ClipScorer
from models.discriminator import load_discriminator
from models.tiny import save_tiny_clip_model, save_tiny_text_encoder
from stages.rewards import REWARD_TERMS, RewardInputs, clip_agg_targets
from stages.train import Trainer
from stages.unpaired import Unpaired, clip_share
from tests.conftest import TOKENIZER_TEXTS
from tests.test_scst import cross_entropy_checkpoint, run_error
from tests.test_training import CAPTIONS, crash_at_step, read_log

# The corpus: sentences of the captions' words, none of them a training caption.
CORPUS = [
    "a red star next to a green square",
    "two black circles on a blue background",
    "a small white triangle above a yellow circle",
    "three pink stars in a row",
    "a dog sitting next to a cat",
    "people riding bikes on a gray background",
]


def image_features(path, captions_per_image: list[list[str]], clip_name: str, seed: int = 0):
    """A feature file of random 'image_embeds' of the CLIP `clip_name`, one row per image, with its captions."""
    embeddings = torch.randn(len(captions_per_image), 32, generator=torch.Generator().manual_seed(seed))
    captions = [{"image_id": row, "caption": c, "clip_embedding": row} for row, cs in enumerate(captions_per_image) for c in cs]
    encoder = {"family": "clip", "name": clip_name, "feature_type": "image_embeds"}
    write_feature_file(path, FeatureFile(embeddings, captions, {"encoder": encoder}))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_gpt2_dir):
    """A whole tiny CLIP, --data of its image embeddings, a captioner trained on them, the corpus's features
    (text embeddings, modality text) and a tiny RoBERTa discriminator."""
    root = tmp_path_factory.mktemp("unpaired")
    scorer = ClipScorer(str(save_tiny_clip_model(root / "clip", TOKENIZER_TEXTS + CORPUS)))
    data = image_features(root / "images.pkl", [[text] for text in CAPTIONS], scorer.name)
    checkpoint = cross_entropy_checkpoint(root / "ce", data, tiny_gpt2_dir)
    rows = [{"image_id": row, "caption": sentence, "clip_embedding": row} for row, sentence in enumerate(CORPUS)]
    meta = {"modality": "text", "encoder": {"family": "clip", "name": scorer.name, "feature_type": "text_embeds"}}
    write_feature_file(root / "corpus.pkl", FeatureFile(scorer.text_embeddings(CORPUS), rows, meta))
    discriminator = save_tiny_text_encoder(root / "discriminator", TOKENIZER_TEXTS + CORPUS)
    return {"scorer": scorer, "data": data, "checkpoint": checkpoint, "corpus": root / "corpus.pkl", "discriminator": discriminator}


def unpaired_args(models, out_dir, *extra: str, data=None) -> list[str]:
    return [
        "--unpaired", "--init_from", str(models["checkpoint"]), "--data", str(data or models["data"]),
        "--corpus", str(models["corpus"]), "--discriminator", str(models["discriminator"]),
        "--clip_model", models["scorer"].name, "--out_dir", str(out_dir), "--prefix", "unpaired",
        "--cache_dir", str(out_dir.parent / "cache"), "--bs", "4", "--lr", "5e-3", "--disc_lr", "1e-3",
        "--scst_samples", "3", "--max_length", "10", "--gan_steps", "1", "--gan_warm_steps", "2", *extra,
    ]  # fmt: skip


def test_clip_agg_target_equals_the_formula(models):
    scorer, corpus = models["scorer"], read_features(models["corpus"])
    features = read_features(models["data"])
    sentences = [s / s.norm() for s in corpus.embeddings.double()]

    def agg(v: torch.Tensor) -> torch.Tensor:  # a = sum_j softmax(100 cos(v, s_j)) s_j, one term at a time
        v = v.double() / v.double().norm()
        weights = [math.exp(100 * float(v @ s)) for s in sentences]
        return sum(w / sum(weights) * s for w, s in zip(weights, sentences, strict=True))

    many = torch.randn(70, 32, generator=torch.Generator().manual_seed(3))  # more than one block of images
    expected = torch.stack([agg(v) for v in many])
    assert torch.allclose(clip_agg_targets(many, corpus.embeddings).double(), expected, atol=1e-5)
    captions = [CAPTIONS[(row + 3) % len(CAPTIONS)] for row in range(len(CAPTIONS))]
    for term, target in (("clip_agg", agg), ("clip_image", lambda v: v.double() / v.double().norm())):
        inputs = RewardInputs(term, features, "images.pkl", clip_model=scorer.name, corpus=corpus)
        scores = REWARD_TERMS[term](inputs)(list(range(len(CAPTIONS))), captions)
        for row, caption in enumerate(captions):
            a, t = target(features.embeddings[row]), scorer.text_embeddings([caption])[0].double()
            cosine = float(a @ t) / float(a.norm() * t.norm())
            assert scores[row].item() == pytest.approx(0.5 * cosine + 0.5 * (1 - float((a - t).abs().mean())), abs=1e-5)


def test_lambda_follows_the_schedule():
    assert [clip_share(step, 0.5, 3, 4) for step in range(9)] == [0, 0, 0, 0, 0.125, 0.25, 0.375, 0.5, 0.5]
    assert [clip_share(step, 0.8, 2, 0) for step in range(4)] == [0, 0, 0.8, 0.8]


def test_the_adversarial_reward_is_the_difference_of_the_discriminators_logits(tmp_path, models, monkeypatch):
    seen, judges = [], []
    original_loss, original_step = stages.unpaired.sampled_loss, Unpaired.train_discriminator

    def recording_loss(network, features, samples, rewards, baselines, **keywords):
        seen.append((samples, rewards, baselines))
        return original_loss(network, features, samples, rewards, baselines, **keywords)

    def recording_step(self, fakes):
        judges.append(copy.deepcopy(self.discriminator.state_dict()))  # D as it judged the samples
        return original_step(self, fakes)

    monkeypatch.setattr(stages.unpaired, "sampled_loss", recording_loss)
    monkeypatch.setattr(Unpaired, "train_discriminator", recording_step)
    train.main(train.parse_args(unpaired_args(models, tmp_path / "run", "--reward", "adv", "--epochs", "1")))
    assert len(seen) == len(judges) == 2
    discriminator = load_discriminator(str(models["discriminator"])).eval()
    log = [record for record in read_log(tmp_path / "run", "unpaired") if "loss" in record]
    for (samples, rewards, baselines), state, record in zip(seen, judges, log, strict=True):
        discriminator.load_state_dict(state)
        with torch.no_grad():
            sampled = discriminator(**discriminator.tokenize(samples.captions, torch.device("cpu"))).view(4, 3)
            greedy = discriminator(**discriminator.tokenize(samples.greedy, torch.device("cpu")))
        assert torch.allclose(rewards - baselines, sampled - greedy.unsqueeze(1), atol=1e-5)
        assert record["adv_reward"] == pytest.approx((sampled - greedy.unsqueeze(1)).mean().item(), abs=1e-5)
        assert record["lambda"] == 0 and "clip_reward" not in record


def test_one_step_moves_the_discriminator_and_the_generator(tmp_path, models):
    train.main(train.parse_args(unpaired_args(models, tmp_path / "run", "--epochs", "1", "--bs", "8")))
    log = [record for record in read_log(tmp_path / "run", "unpaired") if "loss" in record]
    assert len(log) == 1
    assert {"reward", "baseline", "clip_reward", "adv_reward", "lambda", "disc_accuracy", "disc_loss"} <= log[0].keys()
    assert 0 <= log[0]["disc_accuracy"] <= 1
    initial = torch.load(models["checkpoint"], weights_only=True)["model"]
    trained = torch.load(tmp_path / "run" / "unpaired-000.pt", weights_only=True)
    assert "objective" not in trained and trained["model"].keys() == initial.keys()  # the usual checkpoint
    assert any(not torch.equal(initial[name], trained["model"][name]) for name in initial)
    before = load_discriminator(str(models["discriminator"])).encoder.state_dict()
    after = torch.load(tmp_path / "run" / "unpaired_latest.pt", weights_only=True)["objective"]["discriminator"]
    assert any(not torch.equal(before[name], after[f"encoder.{name}"]) for name in before)


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, models, monkeypatch):
    common = ("--epochs", "2", "--save_latest_every", "1")
    train.main(train.parse_args(unpaired_args(models, tmp_path / "straight", *common)))
    interrupted = tmp_path / "interrupted"
    crash_at_step(monkeypatch, Trainer, 2, unpaired_args(models, interrupted, *common))  # saved after step 1
    train.main(train.parse_args(unpaired_args(models, interrupted, *common, "--resume", str(interrupted))))
    for name in ("unpaired-001.pt", "unpaired_latest.pt"):
        expected = torch.load(tmp_path / "straight" / name, weights_only=True)
        resumed = torch.load(interrupted / name, weights_only=True)
        assert all(torch.equal(expected["model"][key], resumed["model"][key]) for key in expected["model"])
    expected_d, resumed_d = (state["objective"]["discriminator"] for state in (expected, resumed))
    assert all(torch.equal(expected_d[key], resumed_d[key]) for key in expected_d)
    straight = [r for r in read_log(tmp_path / "straight", "unpaired") if "loss" in r]
    assert [r["lambda"] for r in straight] == [0, 0, 0.25, 0.5]  # --gan_steps 1, --gan_warm_steps 2, weight 0.5
    def steps(out_dir):  # each step's figures, its speed aside
        return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in read_log(out_dir, "unpaired") if "loss" in r]

    assert steps(interrupted) == steps(tmp_path / "straight")


def test_a_missing_or_wrong_modality_corpus_is_one_line(tmp_path, models, capsys):
    out_dir = tmp_path / "run"
    without = [arg for arg in unpaired_args(models, out_dir) if arg not in ("--corpus", str(models["corpus"]))]
    cases = [
        (without, "--unpaired needs --corpus"),
        (unpaired_args(models, out_dir, "--corpus", str(tmp_path / "missing.pkl")), "missing.pkl"),
        (unpaired_args(models, out_dir, "--corpus", str(models["data"])),
         f"--corpus {models['data']} holds image features, not a sentence corpus's (modality text"),
    ]  # fmt: skip
    for argv, message in cases:
        code, err = run_error(capsys, argv)
        assert code == 2 and message in err and len(err.splitlines()) == 1, (message, err)
    with pytest.raises(SystemExit):
        train.parse_args(["--data", str(models["data"]), "--corpus", str(models["corpus"])])
    assert "--corpus: only with --unpaired" in capsys.readouterr().err


def test_no_caption_of_data_is_read(tmp_path, models, monkeypatch):
    data = image_features(tmp_path / "sentinel.pkl", [[f"SENTINEL{row}"] for row in range(8)], models["scorer"].name)
    texts: list[str] = []
    original = PreTrainedTokenizerBase.__call__

    def recording_call(self, text=None, *args, **kwargs):
        texts.extend([text] if isinstance(text, str) else list(text or []))
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", recording_call)
    train.main(train.parse_args(unpaired_args(models, tmp_path / "run", "--epochs", "1", data=data)))
    assert set(CORPUS) & set(texts)  # the recorder saw the discriminator's real sentences
    assert not [text for text in texts if "SENTINEL" in text]
