"""Webdataset input into the feature store: the same features and captions as a folder with a Karpathy
file, awkward and broken samples skipped and named by shard, pipe: URLs, resume after a kill, and
extraction split over two gloo processes."""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import parse_coco_clip
import stages.extract_webdataset
from data.errors import InputError
from data.store import META_FILE, read_features
from data.webdataset_input import WebdatasetImages
from tests.test_extraction import REPO, write_image

# Shards of (key, image kind or None for no image member, caption or None for no caption member).
GOOD_KINDS = ("rgb", "gray", "cmyk", "rgba_png", "sixteen_bit_png", "palette_png", "rgb", "rgb")
SHARDS = [
    [("img000", "rgb", "a red circle"), ("img001", "truncated", "broken"), ("img002", "gray", "a gray square")],
    [("img003", "cmyk", "a cmyk star"), ("img004", "rgb", None), ("img005", "text", "not an image")],
    [],  # an empty shard
    [("img006", "rgba_png", "a transparent circle"), ("img007", "sixteen_bit_png", "a deep gray"),
     ("img008", "palette_png", "few colors"), ("img009", "empty", "an empty file")],
]  # fmt: skip
GOOD_KEYS = ["img000", "img002", "img003", "img006", "img007", "img008"]


def image_bytes(tmp: Path, key: str, kind: str) -> bytes:
    path = tmp / f"{key}.jpg"
    write_image(path, kind, seed=int(key[3:]) + 1)
    return path.read_bytes()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The shards, and the same images as a folder with a Karpathy file (one caption each)."""
    root = tmp_path_factory.mktemp("wds")
    (root / "shards").mkdir()
    (root / "images").mkdir()
    entries = []
    for number, samples in enumerate(SHARDS):
        with tarfile.open(root / "shards" / f"{number:05d}.tar", "w") as tar:
            for key, kind, caption in samples:
                data = image_bytes(root / "images", key, kind)
                add_member(tar, f"{key}.jpg", data)
                if caption is not None:
                    add_member(tar, f"{key}.txt", caption.encode())
                    entries.append({"filename": f"{key}.jpg", "split": "train", "sentences": [{"raw": caption}]})
    (root / "dataset_wds.json").write_text(json.dumps({"images": entries}))
    return root


def wds_args(root: Path, model_dir: Path, output: Path, *extra: str, pattern: str | None = None) -> list[str]:
    return [
        "--clip_model_type", str(model_dir), "--input_format", "webdataset",
        "--input", pattern or str(root / "shards" / "{00000..00003}.tar"), "--output_format", "shards",
        "--output_file", str(output), "--device", "cpu", "--batch_size", "2", *extra,
    ]  # fmt: skip


def run(args: list[str]):
    return parse_coco_clip.main(parse_coco_clip.parse_args(args))


def test_webdataset_gives_the_features_and_captions_of_the_folder(dataset, tiny_clip_dir, tmp_path, capsys):
    folder = tmp_path / "folder"
    run([
        "--clip_model_type", str(tiny_clip_dir), "--coco_images_dir", str(dataset / "images"),
        "--captions_file", str(dataset / "dataset_wds.json"), "--split", "train", "--output_format", "shards",
        "--output_file", str(folder), "--device", "cpu", "--num_workers", "0", "--batch_size", "3",
    ])  # fmt: skip
    capsys.readouterr()
    shards = tmp_path / "shards"
    run(wds_args(dataset, tiny_clip_dir, shards, "--num_workers", "2"))
    out = capsys.readouterr().out
    from_folder, from_shards = read_features(folder), read_features(shards)
    rows = from_shards.image_rows()
    assert sorted(rows) == GOOD_KEYS == sorted(from_folder.image_rows())
    for key, row in rows.items():
        expected = from_folder.embeddings[from_folder.image_rows()[key]]
        torch.testing.assert_close(from_shards.embeddings[row], expected, atol=2e-6, rtol=1e-5)
    captions = {caption["image_id"]: caption["caption"] for caption in from_shards.captions}
    assert captions == {caption["image_id"]: caption["caption"] for caption in from_folder.captions}
    assert from_shards.meta["encoder"] == from_folder.meta["encoder"]
    # Every bad sample skipped, by reason; one line per shard that had any, naming it.
    report = json.loads((tmp_path / "shards.skipped.json").read_text())
    reasons = {entry["image_id"]: entry["reason"] for entry in report["skipped"]}
    assert sorted(reasons) == ["img001", "img004", "img005", "img009"]
    assert reasons["img004"] == "no 'txt' member" and reasons["img009"] == "empty file"
    assert reasons["img005"] == "not an image" and reasons["img001"].startswith("cannot decode")
    assert "00000.tar: 1 of 3 sample(s) skipped" in out and "00001.tar: 2 of 3 sample(s) skipped" in out
    assert "00002.tar: empty shard (no samples)" in out
    meta = json.loads((shards / META_FILE).read_text())
    assert [shard["rows"] for shard in meta["store"]["shards"]] == [2, 1, 0, 3]
    assert sorted(path.name for path in shards.iterdir() if path.suffix == ".json") == [META_FILE]

    # The same shards through a pipe: URL, as from object storage.
    piped = tmp_path / "piped"
    pattern = f"pipe:cat {dataset / 'shards'}/{{00000..00003}}.tar"
    run(wds_args(dataset, tiny_clip_dir, piped, "--num_workers", "0", pattern=pattern))
    assert torch.equal(read_features(piped).embeddings[:], from_shards.embeddings[:])


def test_a_truncated_or_missing_shard_is_not_done_and_resume_retries_it(dataset, tiny_clip_dir, tmp_path, capsys):
    shards = tmp_path / "in"
    shards.mkdir()
    data = (dataset / "shards" / "00003.tar").read_bytes()
    (shards / "00000.tar").write_bytes(data[:2500])  # cut inside the first image
    (shards / "00001.tar").write_bytes((dataset / "shards" / "00000.tar").read_bytes())
    output = tmp_path / "store"
    pattern = str(shards / "{00000..00002}.tar")  # 00002.tar does not exist
    with pytest.raises(InputError, match=r"2 of 3 shard\(s\) have no results, e\.g\. .*00000\.tar; .*--resume"):
        run(wds_args(dataset, tiny_clip_dir, output, "--num_workers", "0", pattern=pattern))
    out = capsys.readouterr().out
    assert "00000.tar: unexpected end of data after 0 sample(s); not done, run again with --resume" in out
    assert "00002.tar: cannot open" in out and not (output / META_FILE).exists()
    (shards / "00002.tar").write_bytes((dataset / "shards" / "00001.tar").read_bytes())
    with pytest.raises(InputError, match=r"1 of 3 shard\(s\) have no results, e\.g\. .*00000\.tar"):
        run(wds_args(dataset, tiny_clip_dir, output, "--num_workers", "0", "--resume", pattern=pattern))
    (shards / "00000.tar").write_bytes(data)  # downloaded again, whole
    run(wds_args(dataset, tiny_clip_dir, output, "--num_workers", "0", "--resume", pattern=pattern))
    meta = json.loads((output / META_FILE).read_text())
    assert [shard["rows"] for shard in meta["store"]["shards"]] == [3, 2, 1]


def test_a_failed_pipe_command_is_not_done_and_resume_retries_it(dataset, tiny_clip_dir, tmp_path, capsys):
    """webdataset reports a pipe: command's failure only as its stream ends or closes."""
    shards = tmp_path / "in"
    shards.mkdir()
    (shards / "00000.tar").write_bytes((dataset / "shards" / "00000.tar").read_bytes())
    output = tmp_path / "store"
    pattern = f"pipe:cat {shards}/{{00000..00001}}.tar"  # 00001.tar does not exist yet: cat exits 1
    with pytest.raises(InputError, match=r"1 of 2 shard\(s\) have no results, e\.g\. pipe:cat .*00001\.tar"):
        run(wds_args(dataset, tiny_clip_dir, output, "--num_workers", "0", pattern=pattern))
    out = capsys.readouterr().out
    assert "00001.tar: its command exited with status 1 after 0 sample(s); not done" in out
    assert not (output / META_FILE).exists()
    (shards / "00001.tar").write_bytes((dataset / "shards" / "00001.tar").read_bytes())
    run(wds_args(dataset, tiny_clip_dir, output, "--num_workers", "0", "--resume", pattern=pattern))
    assert sorted(read_features(output).image_rows()) == ["img000", "img002", "img003"]


def write_tar(path: Path, members: list[tuple[str, bytes]], links: tuple[tuple[str, bytes, str], ...] = ()) -> None:
    """A tar of `members` (name, data), then `links` (name, tarfile type, target): links, directories."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            add_member(tar, name, data)
        for name, kind, target in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info)


def test_shards_that_reuse_a_key_are_refused_naming_both(dataset, tiny_clip_dir, tmp_path):
    """A key is its sample's image id: two samples with one key would become one image with both captions."""
    shards = tmp_path / "in"
    shards.mkdir()
    for number in range(2):  # each shard numbers its samples from 000000
        members = [(f"{key:06d}{extension}", data)
                   for key in range(2)
                   for extension, data in ((".jpg", image_bytes(tmp_path, f"img{number}{key}", "rgb")),
                                           (".txt", f"picture {key} of shard {number}".encode()))]  # fmt: skip
        write_tar(shards / f"{number:05d}.tar", members)
    output = tmp_path / "store"
    pattern = str(shards / "{00000..00001}.tar")
    with pytest.raises(InputError, match=r"2 key\(s\) .*, e\.g\. '000000' in .*00000\.tar and .*00001\.tar"):
        run(wds_args(dataset, tiny_clip_dir, output, "--num_workers", "0", pattern=pattern))
    assert not (output / META_FILE).exists()
    # Within one shard too, when the key comes back after another sample.
    good = image_bytes(tmp_path, "img000", "rgb")
    write_tar(shards / "again.tar", [(name, data) for key in ("a", "b", "a")
                                     for name, data in ((f"{key}.jpg", good), (f"{key}.txt", b"text"))])  # fmt: skip
    again = wds_args(dataset, tiny_clip_dir, tmp_path / "again", "--num_workers", "0", pattern=str(shards / "again.tar"))
    with pytest.raises(InputError, match=r"1 key\(s\) .*, e\.g\. 'a' twice in .*again\.tar"):
        run(again)


def run_odd_shard(dataset: Path, model_dir: Path, tmp_path: Path, members: list[tuple[str, bytes]], links=()) -> dict:
    """One shard of `members` (and `links`), then a good sample: the skipped samples' reasons, by key."""
    good = image_bytes(tmp_path, "img000", "rgb")
    write_tar(tmp_path / "odd.tar", members, links)
    with tarfile.open(tmp_path / "odd.tar", "a") as tar:
        add_member(tar, "last.jpg", good)
        add_member(tar, "last.txt", b"a good sample")
    output = tmp_path / "store"
    run(wds_args(dataset, model_dir, output, "--num_workers", "0", pattern=str(tmp_path / "odd.tar")))
    assert sorted(read_features(output).image_rows()) == ["last"]  # the shard went on past them
    report = json.loads((tmp_path / "store.skipped.json").read_text())
    return {entry["image_id"]: entry["reason"] for entry in report["skipped"]}


def test_odd_members_are_skipped_by_name(dataset, tiny_clip_dir, tmp_path):
    good = image_bytes(tmp_path, "img000", "rgb")
    members = [
        ("nocaption.jpg", good),
        ("noimage.txt", b"a caption alone"),
        ("text.jpg", b"not an image at all"), ("text.txt", b"a text file as the image"),
        ("empty.jpg", b""), ("empty.txt", b"a zero-byte image"),
        ("blank.jpg", good), ("blank.txt", b"  \n"),
        ("latin.jpg", good), ("latin.txt", "caf\xe9".encode("latin-1")),
        ("symlink.txt", b"its image is a link"), ("hardlink.txt", b"its image is a hard link"),
    ]  # fmt: skip
    links = (("symlink.jpg", tarfile.SYMTYPE, "/etc/hostname"), ("hardlink.jpg", tarfile.LNKTYPE, "text.jpg"),
             ("folder.jpg", tarfile.DIRTYPE, ""))  # fmt: skip
    reasons = run_odd_shard(dataset, tiny_clip_dir, tmp_path, members, links)
    assert reasons == {
        "nocaption": "no 'txt' member", "noimage": "no 'jpg' member", "text": "not an image",
        "empty": "empty file", "blank": "empty caption", "latin": "caption is not UTF-8 text",
        "symlink": "no 'jpg' member", "hardlink": "no 'jpg' member",  # links are never followed
    }  # fmt: skip


def test_member_names_that_leave_the_shard_are_skipped(dataset, tiny_clip_dir, tmp_path):
    """Such a key would be an image id naming a path outside any images directory."""
    good = image_bytes(tmp_path, "img000", "rgb")
    members = [("../up.jpg", good), ("../up.txt", b"up"), ("/abs/root.jpg", good), ("/abs/root.txt", b"abs"),
               ("dir/../../deep.jpg", good), ("dir/../../deep.txt", b"deep")]  # fmt: skip
    reasons = run_odd_shard(dataset, tiny_clip_dir, tmp_path, members)
    assert reasons == dict.fromkeys(["../up", "/abs/root", "dir/../../deep"], "member name is absolute or has '..'")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["img000.jpg", "odd.tar", "store", "store.skipped.json"]


def test_a_sample_with_two_image_members_is_skipped_and_its_shard_goes_on(dataset, tiny_clip_dir, tmp_path):
    good = image_bytes(tmp_path, "img000", "rgb")
    members = [("twice.jpg", good), ("twice.jpg", good), ("twice.txt", b"which image?"),
               ("twotexts.jpg", good), ("twotexts.txt", b"one"), ("twotexts.txt", b"two")]  # fmt: skip
    reasons = run_odd_shard(dataset, tiny_clip_dir, tmp_path, members)
    assert reasons == {"twice": "2 'jpg' members", "twotexts": "2 'txt' members"}


def test_resume_after_a_kill_skips_finished_shards_and_gives_the_same_store(
    dataset, tiny_clip_dir, tmp_path, monkeypatch
):
    whole = tmp_path / "whole"
    run(wds_args(dataset, tiny_clip_dir, whole, "--num_workers", "0"))
    original_write, read = stages.extract_webdataset.write_shard, []

    def killed_at_the_third_shard(*args, **kwargs):
        if args[1] == "shard-00002":
            raise KeyboardInterrupt
        return original_write(*args, **kwargs)

    monkeypatch.setattr(stages.extract_webdataset, "write_shard", killed_at_the_third_shard)
    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run(wds_args(dataset, tiny_clip_dir, resumed, "--num_workers", "0"))
    monkeypatch.undo()
    with pytest.raises(InputError, match=r"partial results were made with other settings \(feature_dtype\)"):
        run(wds_args(dataset, tiny_clip_dir, resumed, "--feature_dtype", "fp16", "--resume"))
    original_read = WebdatasetImages._read_shard

    def recording_read(self, number, url):
        read.append(number)
        return original_read(self, number, url)

    monkeypatch.setattr(WebdatasetImages, "_read_shard", recording_read)
    run(wds_args(dataset, tiny_clip_dir, resumed, "--num_workers", "0", "--resume"))
    assert read == [2, 3]  # shards 0 and 1 were done
    assert sorted(path.name for path in resumed.iterdir()) == sorted(path.name for path in whole.iterdir())
    for path in whole.iterdir():
        if path.name != META_FILE:
            assert (resumed / path.name).read_bytes() == path.read_bytes(), path.name
    assert json.loads((resumed / META_FILE).read_text()) == json.loads((whole / META_FILE).read_text())


def test_bad_flags_are_one_line(dataset, tiny_clip_dir, tmp_path):
    with pytest.raises(InputError, match="needs --input"):
        run(["--clip_model_type", str(tiny_clip_dir), "--input_format", "webdataset", "--output_format", "shards"])
    with pytest.raises(InputError, match="give --output_format shards"):
        run(["--clip_model_type", str(tiny_clip_dir), "--input_format", "webdataset", "--input", "x.tar"])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a feature store's"):
        run(wds_args(dataset, tiny_clip_dir, tmp_path / "taken"))


def test_without_the_webdataset_package_shards_are_one_line(dataset, tiny_clip_dir, tmp_path, monkeypatch):
    """webdataset is imported when shards are read (folder input runs without it, as on the GPU machine)."""
    monkeypatch.setitem(sys.modules, "webdataset", None)  # `import webdataset` raises ImportError
    with pytest.raises(InputError, match="needs the webdataset package"):
        run(wds_args(dataset, tiny_clip_dir, tmp_path / "store"))


def test_torchrun_two_gloo_processes_split_the_shards(dataset, tiny_clip_dir, tmp_path):
    """Each rank reads its shards (and each of its two workers one of them); rank 0 writes meta.json."""
    single = tmp_path / "single"
    run(wds_args(dataset, tiny_clip_dir, single, "--num_workers", "0"))
    output = tmp_path / "torchrun"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "parse_coco_clip.py", *wds_args(dataset, tiny_clip_dir, output, "--num_workers", "2")]  # fmt: skip
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("wrote ") == 1 and "world_size: 2" in completed.stdout
    merged, alone = read_features(output), read_features(single)
    torch.testing.assert_close(merged.embeddings[:], alone.embeddings[:], atol=2e-6, rtol=1e-5)
    assert list(merged.captions) == list(alone.captions)
    rows = [[shard["rows"] for shard in json.loads((store / META_FILE).read_text())["store"]["shards"]]
            for store in (output, single)]  # fmt: skip
    assert rows[0] == rows[1] == [2, 1, 0, 3]
