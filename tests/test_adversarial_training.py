"""Bad input to training, prediction and evaluation (issue 11): each is refused in one line with exit
status 2, nothing is lost, and no traceback is shown."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import evaluate
import predict
import train
from data.captions import load_or_tokenize
from data.errors import InputError, exit_on_input_error
from models import checkpoint as checkpoint_module
from models.checkpoint import build_captioner, load_checkpoint, load_lm, save_checkpoint
from models.config import CaptionerConfig
from models.tiny import save_tiny_gpt2
from tests.test_training import CAPTIONS, FEATURE_DIM, train_args, write_features


def error_line(module, argv: list[str], capsys) -> str:
    """Run a script's main as its `__main__` does; it must exit 2 with one `error:` line, the last one."""
    with pytest.raises(SystemExit) as exited, exit_on_input_error():
        module.main(module.parse_args(argv))
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:") or ": error: " in line]
    assert errors == lines[-1:] and "Traceback" not in lines, lines
    return errors[0]


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_gpt2_dir) -> tuple[Path, Path]:
    """A train.py checkpoint of 16-d features, and a feature file to caption with it."""
    config = CaptionerConfig(feature_dim=FEATURE_DIM, prefix_length=4, lm_name=str(tiny_gpt2_dir))
    path = tmp_path / "model.pt"
    save_checkpoint(path, build_captioner(config, load_lm(str(tiny_gpt2_dir))))
    return path, write_features(tmp_path / "val.pkl", [[text] for text in CAPTIONS[:3]])


def test_degenerate_tokenizer_is_refused_by_train_predict_and_evaluate(tmp_path, tiny_gpt2_dir, capsys):
    # transformers 5 builds a vocabulary of 1 from vocabulary files that do not load: every caption is EOS alone.
    from transformers import GPT2TokenizerFast

    broken = save_tiny_gpt2(tmp_path / "broken_lm", ["a b"])
    GPT2TokenizerFast(vocab_file=str(tmp_path / "none.json"), merges_file=str(tmp_path / "none.txt")).save_pretrained(
        broken
    )
    data = write_features(tmp_path / "train.pkl", [CAPTIONS[:4]])
    message = f"error: tokenizer '{broken}' has a vocabulary of 1 token(s)"
    assert error_line(train, train_args(data, tmp_path / "run", broken), capsys).startswith(message)
    assert not (tmp_path / "run" / "coco_prefix-000.pt").exists()

    config = CaptionerConfig(feature_dim=FEATURE_DIM, prefix_length=4, lm_name=str(broken))
    save_checkpoint(tmp_path / "model.pt", build_captioner(config, load_lm(str(tiny_gpt2_dir))))
    args = ["--checkpoint", str(tmp_path / "model.pt"), "--features", str(data)]
    assert error_line(predict, args, capsys).startswith(message)
    assert error_line(evaluate, args, capsys).startswith(message)


def test_checkpoint_declaring_a_large_lm_is_refused_before_it_is_built(tmp_path, tiny_checkpoint, monkeypatch):
    path, _ = tiny_checkpoint
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["config"]["lm_config"].update(n_layer=48, n_embd=4096, n_head=32)  # 9.6 B parameters
    bloated = tmp_path / "bloated.pt"
    torch.save(checkpoint, bloated)
    original = checkpoint_module.lm_from_config

    def on_meta_only(lm_config):
        # Only shapes may be built (on the meta device), never the declared model's 38 GB.
        assert torch.get_default_device().type == "meta", "the declared LM was built for real"
        return original(lm_config)

    monkeypatch.setattr(checkpoint_module, "lm_from_config", on_meta_only)
    with pytest.raises(InputError, match="weights do not match the model config"):
        load_checkpoint(bloated)


@pytest.mark.parametrize("script", ["predict --checkpoint", "predict --weights", "evaluate", "train --resume"])
def test_zero_byte_checkpoint_is_one_line(tmp_path, tiny_gpt2_dir, capsys, script):
    empty = tmp_path / "empty.pt"
    empty.touch()
    data = write_features(tmp_path / "train.pkl", [CAPTIONS[:4]])
    module, argv = {
        "predict --checkpoint": (predict, ["--checkpoint", str(empty), "--features", str(data)]),
        "predict --weights": (
            predict,
            ["--weights", str(empty), "--features", str(data), "--gpt2", str(tiny_gpt2_dir)],
        ),
        "evaluate": (evaluate, ["--checkpoint", str(empty), "--features", str(data)]),
        "train --resume": (train, train_args(data, tmp_path / "run", tiny_gpt2_dir, "--resume", str(empty))),
    }[script]
    assert error_line(module, argv, capsys) == f"error: {empty}: empty file (0 bytes), not a checkpoint"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--temperature", "nan", "--decode", "sample"], "--temperature nan: must be positive and finite"),
        (["--top_p", "nan", "--decode", "sample"], "--top_p nan: must be in (0, 1]"),
        (["--beam_size", "100000"], "--beam_size 100000: more beams than the LM's"),
        (["--device", "tpu"], "--device tpu: unknown device"),
    ],
)
@pytest.mark.parametrize("module", [predict, evaluate])
def test_bad_decoding_flag_values_are_one_line(tiny_checkpoint, capsys, module, flags, message):
    path, features = tiny_checkpoint
    line = error_line(module, ["--checkpoint", str(path), "--features", str(features), *flags], capsys)
    assert line.startswith(f"error: {message}")


@pytest.mark.parametrize(
    "given",
    [
        ["--mapping_type", "mlp"],
        ["--num_layers", "8"],
        ["--prefix_length", "10"],
        ["--prefix_length_clip", "10"],
        ["--normalize_prefix"],
        ["--gpt2", "gpt2"],
        ["--clip_model_type", "ViT-B/32"],
    ],
)
def test_weights_settings_with_a_checkpoint_are_a_usage_error(tiny_checkpoint, capsys, given):
    path, features = tiny_checkpoint
    line = error_line(predict, ["--checkpoint", str(path), "--features", str(features), *given], capsys)
    assert line.endswith(  # argparse's usage error, after the program's name
        f": error: {given[0]} is a setting of --weights; with --checkpoint the checkpoint's config decides it"
    )


def test_weights_settings_keep_their_defaults():
    args = predict.parse_args(["x.jpg", "--weights", "w.pt", "--num_layers", "2"])
    assert (args.mapping_type, args.prefix_length, args.prefix_length_clip, args.num_layers) == ("mlp", 10, 10, 2)
    assert (args.normalize_prefix, args.clip_model_type, args.gpt2) == (False, "ViT-B/32", "gpt2")


class SilentTokenizer:
    """A tokenizer that turns every text into no tokens, as one whose vocabulary did not load does."""

    name_or_path = "silent-tokenizer"
    eos_token_id = 0
    backend_tokenizer = SimpleNamespace(to_str=lambda: "silent")

    def __call__(self, texts: list[str], add_special_tokens: bool) -> dict:
        return {"input_ids": [[] for _ in texts]}


def test_tokenizer_that_empties_most_captions_is_refused(tmp_path):
    captions = [{"image_id": 0, "caption": text, "clip_embedding": 0} for text in CAPTIONS[:3]]
    with pytest.raises(InputError, match="tokenizer 'silent-tokenizer' turns 3 of 3 captions into no tokens"):
        load_or_tokenize(captions, SilentTokenizer(), tmp_path)
    assert not list(tmp_path.iterdir())  # nothing cached
