"""Bad input to training, prediction and evaluation (issue 11): each is refused in one line with exit
status 2, nothing is lost, and no traceback is shown."""

import fcntl
import os
import shutil
import subprocess
import sys
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
from models.checkpoint import build_captioner, load_checkpoint, save_checkpoint
from models.config import CaptionerConfig
from models.lm import load_lm
from models.tiny import save_tiny_gpt2
from stages.train import Trainer
from tests.conftest import REPO
from tests.test_training import CAPTIONS, FEATURE_DIM, crash_at_step, read_log, train_args, write_features


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


def test_torchrun_waits_for_rank_zero_scoring_past_the_collective_timeout(tmp_path, tiny_gpt2_dir):
    # Java (the PTB tokenizer) made slower than the process group's timeout: the other rank must wait
    # for rank 0's scoring behind a barrier of its own, not time out in the next collective.
    slow_bin = tmp_path / "bin"
    slow_bin.mkdir()
    (slow_bin / "java").write_text(f'#!/bin/sh\nsleep 15\nexec {shutil.which("java")} "$@"\n')
    (slow_bin / "java").chmod(0o755)
    env = {**os.environ, "PATH": f"{slow_bin}{os.pathsep}{os.environ['PATH']}", "CLIPCAP_PG_TIMEOUT_S": "6"}
    data = write_features(tmp_path / "train.pkl", [[text] for text in CAPTIONS])
    val_data = write_features(tmp_path / "val.pkl", [[text] for text in CAPTIONS[:4]])
    args = train_args(data, tmp_path / "ddp", tiny_gpt2_dir, "--only_prefix", "--epochs", "1", "--bs", "2")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py"]
    result = subprocess.run(
        [*command, *args, "--val_data", str(val_data), "--eval_every", "1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [record["epoch"] for record in read_log(tmp_path / "ddp") if "CIDEr" in record] == [0]
    assert (tmp_path / "ddp" / "coco_prefix_best.pt").is_file()


def test_resume_refuses_another_device_type_or_precision(tmp_path, tiny_gpt2_dir):
    data = write_features(tmp_path / "train.pkl", [CAPTIONS[:4]])
    out_dir = tmp_path / "run"
    train.main(train.parse_args(train_args(data, out_dir, tiny_gpt2_dir, "--epochs", "1")))
    latest_path = out_dir / "coco_prefix_latest.pt"
    latest = torch.load(latest_path, weights_only=True)
    assert latest["runtime"] == {"device_type": "cpu", "precision": "fp32"}  # resolved, not the flag's "auto"
    latest["runtime"] = {"device_type": "cuda", "precision": "bf16"}  # as `--precision auto` on a GPU records
    torch.save(latest, latest_path)
    with pytest.raises(InputError) as error:
        train.main(
            train.parse_args(train_args(data, out_dir, tiny_gpt2_dir, "--epochs", "1", "--resume", str(out_dir)))
        )
    assert "computed on cuda in bf16, this one would on cpu in fp32; resume on a cuda device with --precision bf16" in (
        str(error.value)
    )


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


def test_long_captions_are_dropped_and_counted_once(tmp_path, tiny_gpt2_dir, capsys):
    huge = "a dog " * 500  # 3000 characters, referenced by many captions as in the pickle
    data = write_features(tmp_path / "train.pkl", [[CAPTIONS[0], huge, huge], [huge, CAPTIONS[1]]])
    args = train_args(data, tmp_path / "run", tiny_gpt2_dir, "--epochs", "1")
    train.main(train.parse_args(args))
    out = capsys.readouterr().out
    assert out.count("longer than --max_caption_chars") == 1
    assert f"--data {data}: dropped 3 caption(s) longer than --max_caption_chars 2000" in out
    assert '"train_captions": 2' in out
    only_long = write_features(tmp_path / "long.pkl", [[huge]])
    line = error_line(train, train_args(only_long, tmp_path / "run2", tiny_gpt2_dir), capsys)
    assert line == f"error: --data {only_long}: every caption is longer than --max_caption_chars 2000"


@pytest.mark.parametrize(
    ("declared", "message"),
    [
        ({"n_layer": 48, "n_embd": 4096, "n_head": 32}, "declares 48 blocks, the weights hold 2"),  # 9.6 B parameters
        ({"n_embd": 4096, "n_head": 32}, r"wte.weight has shape \(\d+, 64\), the config expects \(\d+, 4096\)"),  # wider
    ],
)
def test_checkpoint_declaring_a_large_lm_is_refused_before_it_is_built(
    tmp_path, tiny_checkpoint, monkeypatch, declared, message
):
    path, _ = tiny_checkpoint
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["config"]["lm_config"].update(declared)
    bloated = tmp_path / "bloated.pt"
    torch.save(checkpoint, bloated)
    original = checkpoint_module.lm_from_config

    def on_meta_only(*arguments):  # lm_config, source, dtype
        # Only shapes may be built (on the meta device), never the declared model's gigabytes.
        assert torch.get_default_device().type == "meta", "the declared LM was built for real"
        return original(*arguments)

    monkeypatch.setattr(checkpoint_module, "lm_from_config", on_meta_only)
    with pytest.raises(InputError, match=message):
        load_checkpoint(bloated)


def test_second_run_in_the_same_directory_and_prefix_is_refused(tmp_path, tiny_gpt2_dir):
    data = write_features(tmp_path / "train.pkl", [CAPTIONS[:4]])
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    (out_dir / "coco_prefix_log.jsonl").write_text('{"step": 1}\n')  # the first run's files
    with open(out_dir / "coco_prefix.lock", "w") as held:  # the first run, still going
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        result = subprocess.run(
            [sys.executable, "train.py", *train_args(data, out_dir, tiny_gpt2_dir, "--overwrite")],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {out_dir} is in use by another run with --prefix coco_prefix (PID 4242, holding coco_prefix.lock); "
        "wait for it to end, or use another --prefix or --out_dir"
    ]
    assert (out_dir / "coco_prefix_log.jsonl").read_text() == '{"step": 1}\n'


def test_resume_drops_a_torn_last_log_line_and_lines_past_the_checkpoint(tmp_path, tiny_gpt2_dir, monkeypatch, capsys):
    data = write_features(tmp_path / "train.pkl", [CAPTIONS[:4], CAPTIONS[4:]])  # 2 steps an epoch
    out_dir = tmp_path / "run"
    args = train_args(data, out_dir, tiny_gpt2_dir, "--epochs", "2", "--save_latest_every", "1")
    crash_at_step(monkeypatch, Trainer, 3, args)
    log = out_dir / "coco_prefix_log.jsonl"
    with open(log, "a") as handle:  # a line past the checkpoint (step 2), then one cut by a full disk
        handle.write('{"step": 3, "epoch": 1, "loss": 1.0}\n{"step": 4, "epo')
    capsys.readouterr()
    train.main(train.parse_args([*args, "--resume", str(out_dir)]))
    out = capsys.readouterr().out
    assert f"resume: dropped the torn last line of {log}" in out
    assert f"resume: dropped 1 line(s) of {log} past step 2, the checkpoint's" in out
    assert [record["step"] for record in read_log(out_dir) if "loss" in record] == [1, 2, 3, 4]


def test_non_finite_weights_are_never_saved(tmp_path, tiny_gpt2_dir, monkeypatch):
    import stages.train

    data = write_features(tmp_path / "train.pkl", [CAPTIONS[:4], CAPTIONS[4:]])  # 2 steps an epoch
    original, steps = stages.train.apply_gradients, []

    def overflow_at_step_two(loss, trainable, *args):
        original(loss, trainable, *args)
        steps.append(1)
        if len(steps) == 2:  # as --lr inf does: the loss was finite, the updated weights are not
            with torch.no_grad():
                trainable[0].fill_(float("inf"))

    monkeypatch.setattr(stages.train, "apply_gradients", overflow_at_step_two)
    out_dir = tmp_path / "run"
    with pytest.raises(
        InputError,
        match=r"weights are not finite after step 2; training stopped without saving them, "
        r"the last good checkpoint is .*coco_prefix_latest.pt",
    ):
        train.main(
            train.parse_args(train_args(data, out_dir, tiny_gpt2_dir, "--epochs", "2", "--save_latest_every", "1"))
        )
    latest = torch.load(out_dir / "coco_prefix_latest.pt", weights_only=True)
    assert latest["position"]["step"] == 1
    assert all(tensor.isfinite().all() for tensor in latest["model"].values() if tensor.is_floating_point())
    assert not (out_dir / "coco_prefix-000.pt").exists()


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
    ("flag", "value", "message"),
    [
        ("--weight_decay", "nan", "--weight_decay nan: must be a finite number"),
        ("--max_grad_norm", "nan", "--max_grad_norm nan: must be a finite number"),
        ("--lr", "nan", "--lr nan: must be positive and finite"),
        ("--lr", "inf", "--lr inf: must be positive and finite"),
        ("--max_caption_chars", "0", "--max_caption_chars 0: must be at least 1"),
        ("--device", "tpu", "--device tpu: unknown device; use auto, cpu, cuda, cuda:N or mps"),
    ],
)
def test_bad_training_flag_values_are_one_line(tmp_path, tiny_gpt2_dir, capsys, flag, value, message):
    data = write_features(tmp_path / "train.pkl", [CAPTIONS[:4]])
    line = error_line(train, [*train_args(data, tmp_path / "run", tiny_gpt2_dir), flag, value], capsys)
    assert line == f"error: {message}"
    assert not (tmp_path / "run").exists()


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
        ["--lm", "gpt2"],
        ["--gpt2", "gpt2"],  # ClipCap's name of --lm
        ["--clip_model_type", "ViT-B/32"],
    ],
)
def test_weights_settings_with_a_checkpoint_are_a_usage_error(tiny_checkpoint, capsys, given):
    path, features = tiny_checkpoint
    line = error_line(predict, ["--checkpoint", str(path), "--features", str(features), *given], capsys)
    flag = "--lm" if given[0] == "--gpt2" else given[0]
    assert line.endswith(  # argparse's usage error, after the program's name
        f": error: {flag} is a setting of --weights; with --checkpoint the checkpoint's config decides it"
    )


def test_weights_settings_keep_their_defaults():
    args = predict.parse_args(["x.jpg", "--weights", "w.pt", "--num_layers", "2"])
    assert (args.mapping_type, args.prefix_length, args.prefix_length_clip, args.num_layers) == ("mlp", 10, 10, 2)
    assert (args.normalize_prefix, args.clip_model_type, args.lm) == (False, "ViT-B/32", "gpt2")


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
