"""LoRA (peft), half-precision LM weights and gradient checkpointing, through the real scripts on tiny GPT-2
and Llama: adapters train and nothing else of the LM, checkpoints hold no base weight, resume is exact,
SCST fine-tunes the adapters, a merged export captions as the LoRA model does, and bad input is one line."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig

import export
import predict
import train
from data.errors import InputError
from models.captioner import ClipCaptionModel
from models.checkpoint import build_captioner, load_checkpoint
from models.config import CaptionerConfig
from models.decoding import DecodingOptions, caption_features
from models.hf_export import load_captioner
from models.lm import enable_gradient_checkpointing, load_lm, load_tokenizer
from models.tiny import save_tiny_causal_lm
from stages.train import Trainer
from tests.conftest import TOKENIZER_TEXTS
from tests.test_scst import scst_args
from tests.test_training import CAPTIONS, FEATURE_DIM, crash_at_step, read_log, train_args, write_features

FAMILIES = ("gpt2", "llama")
LORA = ("--lora_r", "4")
LAST = "coco_prefix-019.pt"  # the lora_run's last epoch


@pytest.fixture(scope="module", params=FAMILIES)
def lm_dir(request, tmp_path_factory):
    return save_tiny_causal_lm(tmp_path_factory.mktemp(request.param), request.param, TOKENIZER_TEXTS)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # Two references per image (SCST's CIDEr needs them to differ), 16 captions: 4 steps an epoch at --bs 4.
    references = [[text, CAPTIONS[(row + 1) % len(CAPTIONS)]] for row, text in enumerate(CAPTIONS)]
    return write_features(tmp_path_factory.mktemp("lora_data") / "train.pkl", references)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, data, lm_dir):
    """A LoRA run of 20 epochs: its output directory and the model it returned."""
    out_dir = tmp_path_factory.mktemp("lora_run") / "run"
    args = train_args(data, out_dir, lm_dir, *LORA, "--epochs", "20", "--save_every", "100", "--lr", "1e-2")
    return out_dir, train.main(train.parse_args(args))


def greedy(model: ClipCaptionModel, lm_dir, features: torch.Tensor) -> list[str]:
    options = DecodingOptions(method="greedy", max_length=12)
    return [captions[0] for captions in caption_features(model, load_tokenizer(str(lm_dir)), features, options)]


def test_only_adapters_and_mapper_train_and_checkpoints_hold_no_base_weight(lora_run, lm_dir):
    out_dir, model = lora_run
    losses = [record["loss"] for record in read_log(out_dir) if "loss" in record]
    # A random LM's head and embeddings stay as they are: the loss falls, but not far (5.9 to about 5.3-5.5).
    assert sum(losses[-4:]) / 4 < losses[0] - 0.3
    pristine = load_lm(str(lm_dir)).state_dict()
    adapters = 0
    for name, parameter in model.gpt.named_parameters():
        if ".lora_" in name:
            adapters += 1
            assert parameter.requires_grad and parameter.dtype == torch.float32
        else:  # peft's name for a wrapped module's own weight: `...q_proj.base_layer.weight`
            assert not parameter.requires_grad and torch.equal(parameter, pristine[name.replace(".base_layer", "")])
    assert adapters == 2 * 2 * (2 if model.gpt.config.model_type == "gpt2" else 4)  # A, B x blocks x targets
    saved = torch.load(out_dir / LAST, weights_only=True)
    lm_keys = [name for name in saved["model"] if name.startswith("gpt.")]
    assert len(lm_keys) == adapters and all(".lora_" in name for name in lm_keys)
    assert any(saved["model"][name].abs().sum() > 0 for name in lm_keys if ".lora_B." in name)  # B starts at 0
    assert saved["config"]["lora"]["r"] == 4 and saved["config"]["lora"]["alpha"] == 8
    assert saved["config"]["lm_in_checkpoint"] is False
    features = torch.randn(4, FEATURE_DIM, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 100, (4, 5), generator=torch.Generator().manual_seed(1))
    loaded = load_captioner(out_dir / LAST)
    with torch.no_grad():
        expected = model.eval()(features, tokens, torch.ones_like(tokens)).logits
        assert torch.equal(loaded(features, tokens, torch.ones_like(tokens)).logits, expected)


def test_a_checkpoint_missing_an_adapter_is_refused(lora_run, tmp_path):
    out_dir, _ = lora_run
    saved = torch.load(out_dir / LAST, weights_only=True)
    dropped = next(name for name in saved["model"] if ".lora_A." in name)
    del saved["model"][dropped]
    torch.save(saved, tmp_path / "damaged.pt")
    with pytest.raises(InputError, match=r"weights do not match the model config: 1 missing \(e\.g\. gpt\..*lora_A"):
        load_checkpoint(tmp_path / "damaged.pt")


def test_resume_reaches_the_weights_of_an_uninterrupted_run(tmp_path, data, lm_dir, monkeypatch):
    # Dropout on the adapters and in the LM (which trains in train mode with LoRA): RNG state matters.
    common = (*LORA, "--lora_dropout", "0.2", "--epochs", "2", "--save_latest_every", "3")
    straight = tmp_path / "straight"
    train.main(train.parse_args(train_args(data, straight, lm_dir, *common)))
    interrupted = tmp_path / "interrupted"
    crash_at_step(monkeypatch, Trainer, 5, train_args(data, interrupted, lm_dir, *common))  # 8 steps; saved at 4
    train.main(train.parse_args(train_args(data, interrupted, lm_dir, *common, "--resume", str(interrupted))))
    for name in ("coco_prefix-001.pt", "coco_prefix_latest.pt"):
        expected = torch.load(straight / name, weights_only=True)["model"]
        resumed = torch.load(interrupted / name, weights_only=True)["model"]
        assert expected.keys() == resumed.keys()
        assert all(torch.equal(expected[key], resumed[key]) for key in expected), name
    with pytest.raises(InputError, match="lora is .* here but .* in the saved run"):
        other_rank = train_args(
            data, interrupted, lm_dir, "--lora_r", "2", "--epochs", "2", "--resume", str(interrupted)
        )
        train.main(train.parse_args(other_rank))


def test_scst_fine_tunes_the_adapters(tmp_path, lora_run, data):  # with gradient checkpointing: sampling too
    out_dir, _ = lora_run
    checkpoint = out_dir / LAST
    args = scst_args(data, checkpoint, tmp_path / "scst", "--epochs", "1", "--gradient_checkpointing")
    model = train.main(train.parse_args(args))
    before = torch.load(checkpoint, weights_only=True)["model"]
    after = torch.load(tmp_path / "scst" / "scst-000.pt", weights_only=True)["model"]
    assert before.keys() == after.keys()
    adapters = [name for name in after if ".lora_" in name]
    assert adapters and any(not torch.equal(before[name], after[name]) for name in adapters)
    initial = load_checkpoint(checkpoint)
    frozen = [(name, p) for name, p in model.gpt.named_parameters() if ".lora_" not in name]
    assert all(torch.equal(p, initial.gpt.get_parameter(name)) for name, p in frozen)


def test_merged_export_captions_as_the_lora_model_and_needs_no_peft(tmp_path, lora_run, lm_dir, data):
    out_dir, _ = lora_run
    checkpoint = out_dir / LAST
    export.main(export.parse_args([str(checkpoint), str(tmp_path / "export")]))
    with safe_open(tmp_path / "export" / "model.safetensors", framework="pt") as handle:
        names = list(handle.keys())
    assert not any(".lora_" in name or ".base_layer." in name for name in names)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["lora"] is None and config["lm_in_checkpoint"] is True
    assert "LoRA adapters (rank 4, alpha 8" in (tmp_path / "export" / "README.md").read_text()
    merged, lora = load_captioner(tmp_path / "export"), load_captioner(checkpoint)
    assert not any(".lora_" in name for name, _ in merged.named_parameters())
    features = torch.randn(8, FEATURE_DIM, generator=torch.Generator().manual_seed(0))  # the training rows
    captions = greedy(lora, lm_dir, features)
    assert greedy(merged, lm_dir, features) == captions
    assert len(set(captions)) > 1  # the adapters and mapper learned something image-dependent
    # predict.py opens both through load_captioner, and writes the same captions.
    for source, output in ((checkpoint, "lora.json"), (tmp_path / "export", "merged.json")):
        predict.main(predict.parse_args(["--features", str(data), "--checkpoint", str(source),
                                         "--output", str(tmp_path / output)]))  # fmt: skip
    assert json.loads((tmp_path / "lora.json").read_text()) == json.loads((tmp_path / "merged.json").read_text())


def test_bf16_lm_weights_train_with_lora_and_frozen(tmp_path, data, lm_dir):
    for mode in (LORA, ("--only_prefix",)):
        out_dir = tmp_path / mode[0].strip("-")
        args = train_args(data, out_dir, lm_dir, *mode, "--lm_dtype", "bf16", "--epochs", "10", "--lr", "1e-2")
        model = train.main(train.parse_args([*args, "--save_every", "100", "--precision", "fp32"]))
        losses = [record["loss"] for record in read_log(out_dir) if "loss" in record]
        assert sum(losses[-4:]) / 4 < losses[0] - 0.1, (mode, losses)  # the frozen LM: the mapper alone learns
        assert model.gpt.get_input_embeddings().weight.dtype == torch.bfloat16
        assert next(model.clip_project.parameters()).dtype == torch.float32
        loaded = load_checkpoint(out_dir / "coco_prefix-009.pt")
        assert loaded.config.lm_dtype == "bf16" and loaded.gpt.get_input_embeddings().weight.dtype == torch.bfloat16
        features = torch.randn(3, FEATURE_DIM)
        assert greedy(loaded, lm_dir, features) == greedy(model.eval(), lm_dir, features)


def loss_and_gradients(model: ClipCaptionModel, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(4, FEATURE_DIM, generator=generator)
    tokens = torch.randint(0, 100, (4, 7), generator=generator)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks
    loss = model.train()(features, tokens, torch.ones_like(tokens)).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["full", "frozen", "lora"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(lm_dir, mode):
    lora = {"r": 4, "alpha": 8, "dropout": 0.1, "targets": ["q_proj", "v_proj"]} if "llama" in str(lm_dir) else None
    lora = lora or {"r": 4, "alpha": 8, "dropout": 0.1, "targets": ["attn.c_attn"]}
    config = CaptionerConfig(
        feature_dim=FEATURE_DIM, prefix_length=4, lm_name=str(lm_dir), lm_in_checkpoint=mode == "full",
        lora=lora if mode == "lora" else None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_captioner(config)
    if mode != "full":
        model.freeze_lm()
    loss, gradients = loss_and_gradients(model)
    enable_gradient_checkpointing(model.gpt)
    blocks = [module for module in model.gpt.modules() if getattr(module, "gradient_checkpointing", False)]
    calls = []
    for block in blocks:  # count the recomputations: a frozen LM in eval mode must checkpoint too
        checkpoint_function = block._gradient_checkpointing_func
        block._gradient_checkpointing_func = lambda *a, f=checkpoint_function, **k: calls.append(1) or f(*a, **k)
    checkpointed_loss, checkpointed = loss_and_gradients(model)
    assert len(calls) == model.gpt.config.num_hidden_layers
    assert torch.allclose(checkpointed_loss, loss)
    assert gradients.keys() == checkpointed.keys() and any(".lora_" in n for n in gradients) == (mode == "lora")
    assert all(torch.allclose(checkpointed[name], gradients[name], atol=1e-6) for name in gradients)
    assert gradients["clip_project.model.0.weight"].abs().sum() > 0  # the prefix gets gradients


def test_train_py_with_gradient_checkpointing_logs_the_losses_of_one_without(tmp_path, data, lm_dir):
    logs = []
    for name, extra in (("plain", ()), ("checkpointed", ("--gradient_checkpointing",))):
        out_dir = tmp_path / name
        train.main(train.parse_args(train_args(data, out_dir, lm_dir, *LORA, "--epochs", "1", *extra)))
        logs.append([record["loss"] for record in read_log(out_dir) if "loss" in record])
    assert torch.allclose(torch.tensor(logs[0]), torch.tensor(logs[1]), atol=1e-6)


def test_bad_lora_and_dtype_input_is_one_line(tmp_path, data, lm_dir):
    run = tmp_path / "run"
    bloom = tmp_path / "bloom"  # a family without default targets (its config is all the check reads)
    AutoConfig.for_model("bloom", hidden_size=32, n_layer=1, n_head=2, vocab_size=64).save_pretrained(bloom)
    cases = [
        ((*LORA, "--lora_targets", "no_such_proj"), r"--lora_targets no_such_proj: no module of .* is named so"),
        ((*LORA, "--only_prefix"), "--lora_r trains adapters in the LM, --only_prefix trains the mapper alone"),
        (("--lm_dtype", "bf16"), "--lm_dtype bf16 trains the LM's weights in bf16, where most updates round away"),
        ((*LORA, "--lora_dropout", "1"), "--lora_dropout 1.0: must be below 1"),
    ]
    for extra, message in cases:
        with pytest.raises(InputError, match=message):
            train.main(train.parse_args(train_args(data, run, lm_dir, *extra)))
    known = r"no default LoRA targets for .*bloom' \(bloom; known: gpt2, .*--lora_targets"
    with pytest.raises(InputError, match=known):
        train.main(train.parse_args(train_args(data, run, bloom, *LORA)))
    with pytest.raises(SystemExit):  # argparse's usage error: the flag needs --lora_r
        train.main(train.parse_args(train_args(data, run, lm_dir, "--lora_alpha", "8")))
