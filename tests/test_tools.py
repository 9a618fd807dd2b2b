"""tools/: interpret_prefix.py's tokens are the nearest by each metric, and plot_run.py draws a run's log into a
PNG, both through their real scripts on a tiny trained run; bad input is one line."""

import json
import shutil
import struct
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

import train
from data.errors import exit_on_input_error
from data.store import read_features
from models.checkpoint import captioner_tokenizer
from models.hf_export import load_captioner
from models.lm import input_embedding_matrix
from tests.test_scst import scst_args
from tests.test_training import CAPTIONS, train_args, write_features
from tests.test_xattn import write_patch_tokens, xattn_args
from tools import interpret_prefix, plot_run

PREFIX_LENGTH = 4  # train_args'
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PANEL_HEIGHT_PX = 350  # plot_run's 3.5 inches a row of panels, at matplotlib's default 100 dpi


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_gpt2_dir):
    """A cross-entropy run (validation loss and CIDEr logged) and an SCST run from its checkpoint."""
    root = tmp_path_factory.mktemp("tools")
    data = write_features(root / "train.pkl", [[text, text] for text in CAPTIONS])
    val = write_features(root / "val.pkl", [[text] for text in CAPTIONS[:4]], seed=1)
    ce_dir, scst_dir = root / "ce", root / "scst"
    extra = ("--epochs", "2", "--val_data", str(val), "--eval_every", "1")
    train.main(train.parse_args(train_args(data, ce_dir, tiny_gpt2_dir, *extra)))
    checkpoint = ce_dir / "coco_prefix-001.pt"
    train.main(train.parse_args(scst_args(data, checkpoint, scst_dir, "--epochs", "1", "--scst_samples", "2")))
    return {"data": data, "checkpoint": checkpoint, "ce": ce_dir, "scst": scst_dir}


def one_line_error(capsys, script: ModuleType, argv: list[str]) -> str:
    """The `error: ...` line a script exits with (status 2), as its __main__ runs it."""
    capsys.readouterr()  # what came before
    with pytest.raises(SystemExit) as exit_info, exit_on_input_error():
        script.main(script.parse_args(argv))
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(error.splitlines()) == 1, error
    return error


def test_interpret_prefix_gives_the_nearest_token_by_each_metric(run, tmp_path, capsys, monkeypatch):
    output = tmp_path / "prefix.json"
    argv = [str(run["checkpoint"]), "--features", str(run["data"]), "--num_images", "3", "--batch_size", "2"]
    interpret_prefix.main(interpret_prefix.parse_args([*argv, "--output", str(output)]))
    printed = capsys.readouterr().out.splitlines()
    written = json.loads(output.read_text())["images"]

    assert [image["image_id"] for image in written] == [0, 1, 2]
    assert [image["caption"] for image in written] == CAPTIONS[:3]  # each image's first caption
    assert len(printed) == 3 * (1 + PREFIX_LENGTH)  # per image: its line, then one per prefix position
    assert printed[0] == f"image 0: {CAPTIONS[0]!r}"

    model = load_captioner(run["checkpoint"])
    tokenizer = captioner_tokenizer(model)
    embeddings = input_embedding_matrix(model.gpt).detach()  # (V, E)
    with torch.no_grad():
        prefixes = model.condition(read_features(run["data"]).embeddings[:3]).prefix  # (3, P, E)
    for image, prefix, lines in zip(written, prefixes, [printed[i * 5 : i * 5 + 5] for i in range(3)]):
        assert len(image["positions"]) == PREFIX_LENGTH
        expected = {
            "l2": (prefix[:, None] - embeddings[None]).square().sum(-1).argmin(1),  # (P,)
            "cosine": F.cosine_similarity(prefix[:, None], embeddings[None], dim=-1).argmax(1),
            "dot": (prefix @ embeddings.T).argmax(1),
        }
        for position, entry in enumerate(image["positions"]):
            for metric, ids in expected.items():
                assert entry[metric]["token_id"] == ids[position].item(), (metric, position)
                assert entry[metric]["token"] == tokenizer.decode([ids[position].item()])
                assert f"{metric} {entry[metric]['token']!r}" in lines[1 + position]
    # Chunked over the vocabulary, the same tokens.
    monkeypatch.setattr(interpret_prefix, "VOCAB_CHUNK", 7)
    assert len(embeddings) > 7
    assert interpret_prefix.main(interpret_prefix.parse_args(argv)) == written


def test_interpret_prefix_bad_input_is_one_line(run, tmp_path, capsys, tiny_gpt2_dir):
    checkpoint, data = str(run["checkpoint"]), str(run["data"])
    error = one_line_error(capsys, interpret_prefix, [checkpoint, "--features", data, "--num_images", "0"])
    assert "--num_images 0" in error
    error = one_line_error(capsys, interpret_prefix, [checkpoint, "--features", str(tmp_path / "none.pkl")])
    assert "none.pkl" in error
    wider = write_features(tmp_path / "wider.pkl", [[text] for text in CAPTIONS], feature_dim=24)
    assert "24-d" in one_line_error(capsys, interpret_prefix, [checkpoint, "--features", str(wider)])
    patch_tokens = write_patch_tokens(tmp_path / "tokens.pkl", [[text] for text in CAPTIONS])
    xattn_dir = tmp_path / "xattn"
    train.main(train.parse_args(xattn_args(patch_tokens, xattn_dir, tiny_gpt2_dir, "--epochs", "1", "--only_prefix")))
    error = one_line_error(
        capsys, interpret_prefix, [str(xattn_dir / "coco_prefix-000.pt"), "--features", str(patch_tokens)]
    )
    assert "cross-attention" in error and "no prefix" in error


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the magic bytes."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_run_draws_a_cross_entropy_run(run, tmp_path, capsys):
    output = tmp_path / "ce.png"
    plot_run.main(plot_run.parse_args([str(run["ce"]), "--output", str(output)]))
    assert output.stat().st_size > 10_000
    # Panels: loss, learning rate, validation loss, validation scores; no rewards, no lengths: two rows.
    assert png_size(output) == (1200, 2 * PANEL_HEIGHT_PX)
    assert "damaged" not in capsys.readouterr().err


def test_plot_run_draws_an_scst_run_and_skips_damaged_lines(run, tmp_path, capsys):
    run_dir = tmp_path / "scst"
    shutil.copytree(run["scst"], run_dir)
    records, _ = plot_run.read_log(run_dir / "scst_log.jsonl")
    assert {"reward", "baseline", "sample_length"} <= set(records[0])  # the SCST figures plot_run draws
    with open(run_dir / "scst_log.jsonl", "a") as log:
        log.write('not json\n["a list"]\n{"step": 9, "lo')  # two bad lines and a torn last one
    output = tmp_path / "scst.png"
    plot_run.main(plot_run.parse_args([str(run_dir), "--output", str(output)]))
    assert "skipped 3 damaged line(s)" in capsys.readouterr().err
    # loss, lr, rewards; caption lengths and rewards histograms: three rows.
    assert png_size(output) == (1200, 3 * PANEL_HEIGHT_PX)
    predictions = tmp_path / "preds.json"
    predictions.write_text(json.dumps([{"image_id": row, "caption": text} for row, text in enumerate(CAPTIONS)]))
    with_predictions = tmp_path / "with_predictions.png"
    plot_run.main(
        plot_run.parse_args([str(run_dir), "--output", str(with_predictions), "--predictions", str(predictions)])
    )
    assert png_size(with_predictions) == (1200, 3 * PANEL_HEIGHT_PX)
    assert with_predictions.read_bytes() != output.read_bytes()  # another lengths histogram


def test_plot_run_bad_input_is_one_line(run, tmp_path, capsys):
    shared = tmp_path / "shared"
    shared.mkdir()
    for name in ("coco_prefix_log.jsonl", "scst_log.jsonl"):
        shutil.copy(run["ce" if name.startswith("coco") else "scst"] / name, shared / name)
    output = str(tmp_path / "out.png")
    error = one_line_error(capsys, plot_run, [str(shared), "--output", output])
    assert "coco_prefix, scst" in error and "--prefix" in error
    plot_run.main(plot_run.parse_args([str(shared), "--prefix", "scst", "--output", output]))  # chosen, it draws
    assert png_size(tmp_path / "out.png") == (1200, 3 * PANEL_HEIGHT_PX)  # the SCST run's panels
    assert "--prefix 'other'" in one_line_error(
        capsys, plot_run, [str(shared), "--prefix", "other", "--output", output]
    )
    assert "not a directory" in one_line_error(capsys, plot_run, [str(tmp_path / "none"), "--output", output])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "run_log.jsonl").write_text('{"step": 1, "epoch": 0, "val_loss": 1.0}\n')
    assert "no training step records" in one_line_error(capsys, plot_run, [str(tmp_path / "empty"), "--output", output])
    error = one_line_error(capsys, plot_run, [str(run["ce"]), "--output", str(tmp_path)])
    assert "is a directory" in error
