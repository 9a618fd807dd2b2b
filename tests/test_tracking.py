"""--wandb: train.py and train_clip.py log to an offline W&B run, read back here from its `.wandb` file (W&B's
transaction log: LevelDB's log format holding protobuf Records); only rank 0 logs; --resume continues the same
W&B run; without the wandb package, --wandb is one line."""

import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import train
import train_clip
from data.errors import InputError
from data.features import FeatureFile, write_feature_file
from stages.tracking import Tracker, make_tracker
from stages.train import Trainer
from tests.test_scst import scst_args
from tests.test_train_clip import align_args
from tests.test_training import CAPTIONS, FEATURE_DIM, Interrupted, train_args, write_features

# LevelDB's log format, which W&B's .wandb files use: 32 KiB blocks of chunks, each with a 7-byte header
# (CRC, length, kind); the file opens with its own 7-byte header (":W&B", magic, version).
BLOCK_SIZE, HEADER_SIZE = 32768, 7
FULL, LAST = 1, 4


def wandb_records(path: Path) -> list:
    """Every protobuf Record of a .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:HEADER_SIZE]
    records, pending, position = [], b"", HEADER_SIZE
    while position + HEADER_SIZE <= len(data):
        if BLOCK_SIZE - position % BLOCK_SIZE < HEADER_SIZE:  # a block's tail too short for a header is padding
            position += BLOCK_SIZE - position % BLOCK_SIZE
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + HEADER_SIZE])
        pending += data[position + HEADER_SIZE : position + HEADER_SIZE + length]
        position += HEADER_SIZE + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def offline_runs(out_dir: Path) -> list[dict]:
    """Each offline run under out_dir/wandb/, oldest first: its id, exit code, history rows by step (values
    decoded from JSON, nested keys joined by "/") and artifacts (name, type, and each file's staged copy)."""
    import wandb

    wandb.teardown()  # W&B's service process writes the .wandb files: once it has stopped, they are whole
    runs = []
    for run_file in sorted((out_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        run = {"history": {}, "artifacts": [], "exit_code": None}
        for record in wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["id"] = record.run.run_id
            elif kind == "history":
                row = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item
                }
                run["history"].setdefault(row["_step"], {}).update(row)
            elif kind == "artifact":
                files = {entry.path: Path(entry.local_path) for entry in record.artifact.manifest.contents}
                run["artifacts"].append({"name": record.artifact.name, "type": record.artifact.type, "files": files})
            elif kind == "exit":
                run["exit_code"] = record.exit.exit_code
        runs.append(run)
    return runs


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline, silent, with every directory it writes under tmp_path and no system monitor."""
    pytest.importorskip("wandb")
    for name, value in {
        "WANDB_MODE": "offline",  # never the network
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",  # leave stdout to pytest
        "WANDB__DISABLE_STATS": "true",  # no system-metrics sampler
        "WANDB__DISABLE_META": "true",  # no git or machine probing
        "WANDB_DIR": str(tmp_path / "wandb_dir"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb_data"),  # artifact staging
    }.items():
        monkeypatch.setenv(name, value)


def captioned_val_file(tmp_path: Path) -> Path:
    """A validation feature file whose meta names its COCO annotation file and images, as parse_coco_clip.py writes."""
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    colors = ["red", "green", "yellow", "purple"]
    for row, color in enumerate(colors):
        Image.new("RGB", (400, 300), color).save(images_dir / f"{row}.png")
    annotations = tmp_path / "captions_val.json"
    annotations.write_text(
        json.dumps(
            {
                "images": [{"id": row, "file_name": f"{row}.png"} for row in range(len(colors))],
                "annotations": [{"image_id": row, "caption": CAPTIONS[row]} for row in range(len(colors))],
            }
        )
    )
    captions = [{"image_id": row, "caption": CAPTIONS[row], "clip_embedding": row} for row in range(len(colors))]
    meta = {"feature_dim": FEATURE_DIM, "captions_file": str(annotations), "images_dir": str(images_dir), "split": None}
    path = tmp_path / "val.pkl"
    write_feature_file(path, FeatureFile(torch.randn(len(colors), FEATURE_DIM), captions, meta))
    return path


def test_train_logs_an_offline_run_and_resume_continues_it(tmp_path, tiny_gpt2_dir, offline_wandb, monkeypatch):
    data = write_features(tmp_path / "train.pkl", [[text] for text in CAPTIONS[:4]])  # 1 step an epoch
    out_dir = tmp_path / "run"
    args = train_args(data, out_dir, tiny_gpt2_dir, "--epochs", "2", "--val_data", str(captioned_val_file(tmp_path)))
    args += ["--eval_every", "1", "--wandb", "--wandb_project", "tests", "--wandb_run_name", "tiny"]
    original_epoch = Trainer.train_epoch

    def crash_in_epoch_one(self, epoch):
        if epoch == 1:
            raise Interrupted
        original_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", crash_in_epoch_one)
    with pytest.raises(Interrupted):
        train.main(train.parse_args(args))
    monkeypatch.setattr(Trainer, "train_epoch", original_epoch)
    train.main(train.parse_args([*args, "--resume", str(out_dir)]))

    crashed, resumed = offline_runs(out_dir)
    assert crashed["id"] == resumed["id"]  # one W&B run, continued
    assert torch.load(out_dir / "coco_prefix_latest.pt", weights_only=True)["position"]["wandb_run_id"] == resumed["id"]
    assert (crashed["exit_code"], resumed["exit_code"]) == (1, 0)
    history = {**crashed["history"], **resumed["history"]}
    assert sorted(history) == [1, 2]
    for step in (1, 2):
        assert {"loss", "lr", "samples_per_s", "epoch", "val_loss", "CIDEr", "Bleu_4"} <= history[step].keys()
        assert history[step]["val_captions/_type"] == "table-file"
    assert history[1]["epoch"] == 0 and history[2]["epoch"] == 1

    # The captions table travels as a run_table artifact: its JSON and the images it points to.
    tables = [artifact["files"] for artifact in resumed["artifacts"] if artifact["type"] == "run_table"]
    table = json.loads(tables[-1]["val_captions.table.json"].read_text())
    assert table["columns"] == ["image_id", "caption", "references", "image"]
    assert [row[0] for row in table["data"]] == ["0", "1", "2", "3"]
    assert all(isinstance(row[1], str) for row in table["data"])  # an untrained model's caption
    assert [row[2] for row in table["data"]] == CAPTIONS[:4]
    for row in table["data"]:
        with Image.open(tables[-1][row[3]["path"]]) as image:
            assert image.size == (256, 192)  # a thumbnail of the 400x300 image
    models = [artifact for run in (crashed, resumed) for artifact in run["artifacts"] if artifact["type"] == "model"]
    assert [(model["name"], list(model["files"])) for model in models] == [("coco_prefix", ["coco_prefix-001.pt"])]


def test_scst_logs_its_figures_and_keeps_both_best_models(tmp_path, tiny_gpt2_dir, offline_wandb):
    data = write_features(tmp_path / "train.pkl", [[text] for text in CAPTIONS[:4]])
    train.main(train.parse_args(train_args(data, tmp_path / "ce", tiny_gpt2_dir, "--epochs", "1")))
    out_dir = tmp_path / "scst"
    args = scst_args(data, tmp_path / "ce" / "coco_prefix-000.pt", out_dir, "--epochs", "1", "--max_length", "4")
    train.main(
        train.parse_args([*args, "--val_data", str(captioned_val_file(tmp_path)), "--eval_every", "1", "--wandb"])
    )
    (logged,) = offline_runs(out_dir)
    assert {"loss", "lr", "samples_per_s", "reward", "baseline", "sample_length"} <= logged["history"][1].keys()
    assert {"val_loss", "CIDEr", "Bleu_4", "val_captions/_type"} <= logged["history"][1].keys()
    assert [artifact["name"] for artifact in logged["artifacts"] if artifact["type"] == "model"] == ["scst"]
    assert (out_dir / "scst_best.pt").is_file() and (out_dir / "scst_best_loss.pt").is_file()


def test_train_clip_logs_an_offline_run(synthetic, tmp_path, offline_wandb):
    run = tmp_path / "align"
    train_clip.main(train_clip.parse_args(align_args(synthetic, run, "--wandb", "--wandb_project", "tests")))
    (logged,) = offline_runs(run)
    assert logged["exit_code"] == 0 and sorted(logged["history"]) == [1, 2, 3, 4, 5, 6]  # 24 images, batches of 8
    recalls = ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "R@sum"]
    for step, row in logged["history"].items():
        assert {"loss", "lr", "images_per_s", "logit_scale", "epoch"} <= row.keys()
        assert set(recalls) <= row.keys() if step in (3, 6) else not set(recalls) & row.keys()
    (artifact,) = logged["artifacts"]
    assert (artifact["name"], artifact["type"]) == ("align-encoder", "model")
    assert {"config.json", "model.safetensors"} <= set(artifact["files"])


@pytest.mark.parametrize("script", ["train", "train_clip"])
def test_wandb_without_the_package_is_one_line(tmp_path, tiny_gpt2_dir, synthetic, monkeypatch, script):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    if script == "train":
        data = write_features(tmp_path / "train.pkl", [CAPTIONS[:2]])
        args = train.parse_args([*train_args(data, tmp_path / "run", tiny_gpt2_dir), "--wandb"])
        run = train.main
    else:
        args, run = train_clip.parse_args(align_args(synthetic, tmp_path / "run", "--wandb")), train_clip.main
    with pytest.raises(InputError, match=r"^--wandb needs the wandb package: pip install wandb$"):
        run(args)


def test_online_without_credentials_is_one_line(tmp_path, tiny_gpt2_dir, offline_wandb, monkeypatch):
    for name, value in {"WANDB_MODE": "online", "HOME": str(tmp_path), "NETRC": str(tmp_path / "netrc")}.items():
        monkeypatch.setenv(name, value)  # no key in ~/.netrc or W&B's settings: init fails before the network
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    data = write_features(tmp_path / "train.pkl", [CAPTIONS[:2]])
    args = train.parse_args([*train_args(data, tmp_path / "run", tiny_gpt2_dir), "--wandb"])
    with pytest.raises(
        InputError, match=r"^--wandb: No API key configured.*\(WANDB_MODE=offline logs without the network\)$"
    ):
        train.main(args)


def test_only_the_main_process_tracks():
    pytest.importorskip("wandb")
    assert type(make_tracker(True, "project", None, Path("out"), is_main=False)) is Tracker  # logs nothing
    assert type(make_tracker(False, "project", None, Path("out"), is_main=True)) is Tracker
    assert type(make_tracker(True, "project", None, Path("out"), is_main=True)) is not Tracker
