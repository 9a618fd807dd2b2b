"""prepare_data.py against a local HTTP server on 127.0.0.1 serving small zips under the real file names: the
layout parse_coco_clip.py reads, a resume after a dropped connection, a corrupt checksum, an existing tree,
a zip member outside the target, and Flickr30k from a local zip."""

import hashlib
import io
import json
import shlex
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

import parse_coco_clip
import prepare_data
from data.annotations import image_files, read_annotations
from data.errors import InputError

REPO = Path(__file__).resolve().parents[1]


class FixtureServer:
    """Serves `files` (name -> bytes) with Range support; can drop a file's connection once after some bytes,
    serve a file's bytes corrupted, or ignore Range. Records each request's (path, Range header)."""

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.drop_once: dict[str, int] = {}  # name -> bytes sent before the connection is cut (once)
        self.corrupt: set[str] = set()
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests.append((name, self.headers.get("Range")))
                if name not in server.files:
                    self.send_error(404, "Not Found")
                    return
                body = server.files[name]
                if name in server.corrupt:
                    body = bytes([body[0] ^ 0xFF]) + body[1:]
                start = 0
                range_header = self.headers.get("Range")
                if range_header and not server.ignore_range:
                    start = int(range_header.removeprefix("bytes=").rstrip("-"))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                cut = server.drop_once.pop(name, None)
                self.wfile.write(body[start:cut] if cut is not None else body[start:])
                if cut is not None:
                    self.wfile.flush()
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def jpeg(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, "JPEG")
    return buffer.getvalue()


def make_zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def karpathy(images: list[tuple[str | None, str, str]]) -> bytes:
    """A Karpathy file: (filepath, filename, split) per image, two captions each."""
    entries = []
    for index, (filepath, filename, split) in enumerate(images):
        entry = {"filename": filename, "split": split, "imgid": index, "sentences": [{"raw": f"a photo {index}"}] * 2}
        if filepath:
            entry.update(filepath=filepath, cocoid=index + 1)
        entries.append(entry)
    return json.dumps({"images": entries, "dataset": "x"}).encode()


COCO_TRAIN = [f"COCO_train2014_{i:012d}.jpg" for i in (1, 2, 3)]
COCO_VAL = [f"COCO_val2014_{i:012d}.jpg" for i in (4, 5, 6, 7)]
FLICKR = [f"{1000 + i}_abc.jpg" for i in range(4)]
SPLITS = ["train", "restval", "val", "test"]


def fixture_files() -> dict[str, bytes]:
    coco = [("train2014", name, split) for name, split in zip(COCO_TRAIN, ["train", "restval", "train"])]
    coco += [("val2014", name, split) for name, split in zip(COCO_VAL, ["val", "test", "restval", "train"])]
    flickr = [(None, name, split) for name, split in zip(FLICKR, ["train", "val", "test", "train"])]
    return {
        "train2014.zip": make_zip({f"train2014/{name}": jpeg((200, 0, 0)) for name in COCO_TRAIN}),
        "val2014.zip": make_zip({f"val2014/{name}": jpeg((0, 200, 0)) for name in COCO_VAL}),
        "caption_datasets.zip": make_zip(
            {"dataset_coco.json": karpathy(coco), "dataset_flickr8k.json": karpathy(flickr),
             "dataset_flickr30k.json": karpathy(flickr)}
        ),
        "Flickr8k_Dataset.zip": make_zip(
            {**{f"Flicker8k_Dataset/{name}": jpeg((0, 0, 200)) for name in FLICKR}, "__MACOSX/._x.jpg": b"junk"}
        ),
        "Flickr8k_text.zip": make_zip({"Flickr8k.token.txt": b"1000_abc.jpg#0\ta photo\n"}),
        "flickr30k-images.zip": make_zip({f"flickr30k-images/{name}": jpeg((9, 9, 9)) for name in FLICKR}),
    }


def write_manifest(path: Path, files: dict[str, bytes]) -> Path:
    """The fixtures' sizes, md5s and image counts, as --manifest takes them (the user's Flickr30k zip has
    no known size or checksum, as in the real manifest: only its image count)."""
    counts = {"train2014.zip": 3, "val2014.zip": 4}
    manifest = {
        name: {"size": len(data), "checksum": f"md5:{hashlib.md5(data).hexdigest()}", "images": counts.get(name)}
        for name, data in files.items()
    }
    manifest["flickr30k-images.zip"] = {"images": 4}
    path.write_text(json.dumps(manifest))
    return path


@pytest.fixture
def files():
    return fixture_files()


@pytest.fixture
def server(files):
    with FixtureServer(files) as running:
        yield running


@pytest.fixture
def manifest(tmp_path, files):
    return write_manifest(tmp_path / "manifest.json", files)


def prepare(dataset: str, root: Path, server: FixtureServer, manifest: Path, *extra: str) -> list[str]:
    argv = [dataset, "--root", str(root), "--mirror", server.url, "--manifest", str(manifest), *extra]
    return prepare_data.main(prepare_data.parse_args(argv))


def test_coco_layout_is_what_parse_coco_clip_reads(tmp_path, server, manifest, capsys):
    root = tmp_path / "data"
    commands = prepare("coco", root, server, manifest)
    coco = root / "coco"
    assert sorted(p.name for p in (coco / "train2014").iterdir()) == COCO_TRAIN
    assert sorted(p.name for p in (coco / "val2014").iterdir()) == COCO_VAL
    # the Karpathy file parse_coco_clip reads, every image of every split found in the layout
    captions_file = coco / "dataset_coco.json"
    assert len(read_annotations(captions_file, "train+restval", coco)) == 5  # 3 train, 2 restval
    for split in ("train+restval", "val", "test"):
        assert all(path.is_file() for path in image_files(captions_file, split, coco).values())
    # the printed commands, with the real paths, are parse_coco_clip.py command lines
    printed = capsys.readouterr().out
    assert len(commands) == 3 and all(command in printed for command in commands)
    for command, split in zip(commands, ("train+restval", "val", "test")):
        words = shlex.split(command)
        assert words[:2] == ["python", "parse_coco_clip.py"]
        args = parse_coco_clip.parse_args(words[2:])
        assert (Path(args.coco_images_dir), Path(args.captions_file), args.split) == (coco, captions_file, split)
    assert Path(parse_coco_clip.parse_args(shlex.split(commands[0])[2:]).output_file) == coco / "clip_train.pkl"
    assert not list(root.rglob("*.part"))


def test_a_dropped_connection_resumes_from_the_partial_file(tmp_path, server, manifest, files):
    root = tmp_path / "data"
    server.drop_once["train2014.zip"] = 700
    with pytest.raises(InputError, match=r"train2014\.zip: connection dropped after 700 of \d+ bytes; re-run"):
        prepare("coco", root, server, manifest)
    part = root / "downloads" / "train2014.zip.part"
    assert part.stat().st_size == 700 and not (root / "coco").exists()
    server.requests.clear()
    prepare("coco", root, server, manifest)
    assert ("train2014.zip", "bytes=700-") in server.requests  # continued where it stopped
    assert (root / "downloads" / "train2014.zip").read_bytes() == files["train2014.zip"]
    assert len(list((root / "coco" / "train2014").iterdir())) == 3


def test_a_server_that_ignores_range_restarts_cleanly(tmp_path, server, manifest, files):
    root = tmp_path / "data"
    server.drop_once["val2014.zip"] = 500
    with pytest.raises(InputError, match="connection dropped after 500"):
        prepare("coco", root, server, manifest)
    server.ignore_range = True  # answers 200 with the whole file: the partial one is replaced, not appended to
    prepare("coco", root, server, manifest)
    assert (root / "downloads" / "val2014.zip").read_bytes() == files["val2014.zip"]


def test_a_corrupt_download_is_one_line_and_nothing_is_extracted(tmp_path, server, manifest):
    root = tmp_path / "data"
    server.corrupt.add("val2014.zip")
    argv = ["coco", "--root", str(root), "--mirror", server.url, "--manifest", str(manifest)]
    result = subprocess.run(
        [sys.executable, "prepare_data.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {server.url}/val2014.zip: md5 checksum mismatch")
    assert not (root / "coco").exists()  # nothing extracted
    assert not (root / "downloads" / "val2014.zip.part").exists()  # a wrong file is not continued


def test_size_mismatch_and_http_errors_name_the_url(tmp_path, server, manifest, files):
    root = tmp_path / "data"
    overrides = json.loads(manifest.read_text())
    overrides["train2014.zip"]["size"] = len(files["train2014.zip"]) - 1
    manifest.write_text(json.dumps(overrides))
    with pytest.raises(InputError, match=r"train2014\.zip: size mismatch, \d+ bytes where \d+ are expected"):
        prepare("coco", root, server, manifest)
    del server.files["train2014.zip"]
    with pytest.raises(InputError, match=r"train2014\.zip: HTTP error 404"):
        prepare("coco", root, server, manifest)


def test_an_existing_tree_is_kept_without_overwrite(tmp_path, server, manifest):
    root = tmp_path / "data"
    mine = root / "coco" / "train2014" / "mine.jpg"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"keep me")
    with pytest.raises(InputError, match=r"train2014: already exists; give --overwrite"):
        prepare("coco", root, server, manifest)
    assert mine.read_bytes() == b"keep me" and server.requests == []  # refused before any download
    prepare("coco", root, server, manifest, "--overwrite")
    assert sorted(p.name for p in mine.parent.iterdir()) == COCO_TRAIN


def test_a_member_outside_the_target_is_refused(tmp_path, files, manifest):
    files["train2014.zip"] = make_zip(
        {**{f"train2014/{name}": b"x" for name in COCO_TRAIN[:2]}, "train2014/../../evil.jpg": b"evil"}
    )
    write_manifest(manifest, files)
    root = tmp_path / "data"
    with FixtureServer(files) as server, pytest.raises(InputError, match=r"would land outside the target"):
        prepare("coco", root, server, manifest)
    assert not list(tmp_path.rglob("evil.jpg")) and not (root / "coco" / "train2014").exists()


def test_flickr8k_from_the_mirror(tmp_path, server, manifest):
    root = tmp_path / "data"
    commands = prepare("flickr8k", root, server, manifest)
    flickr = root / "flickr8k"
    assert sorted(p.name for p in (flickr / "Flicker8k_Dataset").iterdir()) == FLICKR  # no __MACOSX
    assert (flickr / "Flickr8k_text" / "Flickr8k.token.txt").is_file()
    assert len(read_annotations(flickr / "dataset_flickr8k.json", "train", flickr / "Flicker8k_Dataset")) == 2
    assert f"--coco_images_dir {flickr / 'Flicker8k_Dataset'}" in commands[0]


def test_flickr30k_from_a_local_zip(tmp_path, server, manifest, files):
    root = tmp_path / "data"
    with pytest.raises(InputError, match=r"flickr30k needs --flickr30k_zip PATH: .*request form"):
        prepare("flickr30k", root, server, manifest)
    local = tmp_path / "my_flickr30k.zip"
    local.write_bytes(files["flickr30k-images.zip"])
    commands = prepare("flickr30k", root, server, manifest, "--flickr30k_zip", str(local))
    images = root / "flickr30k" / "flickr30k-images"
    assert sorted(p.name for p in images.iterdir()) == FLICKR
    assert [name for name, _ in server.requests] == ["caption_datasets.zip"]  # only the split file is fetched
    assert f"--captions_file {root / 'flickr30k' / 'dataset_flickr30k.json'}" in commands[0]
    # a zip short of the expected image count is refused before anything is laid out
    local.write_bytes(make_zip({f"flickr30k-images/{name}": b"x" for name in FLICKR[:3]}))
    with pytest.raises(InputError, match=r"3 images where 4 are expected"):
        prepare("flickr30k", tmp_path / "other", server, manifest, "--flickr30k_zip", str(local))


def test_a_member_with_a_bad_crc_is_refused_and_nothing_is_laid_out(tmp_path, files, manifest):
    good = files["val2014.zip"]
    flipped = good.index(jpeg((0, 200, 0))) + 100  # a byte inside the first member's data
    files["val2014.zip"] = good[:flipped] + bytes([good[flipped] ^ 0xFF]) + good[flipped + 1 :]
    write_manifest(manifest, files)  # the download verifies: the damage is found by the CRC as it is extracted
    root = tmp_path / "data"
    with FixtureServer(files) as server, pytest.raises(InputError, match=r"val2014\.zip: corrupt member"):
        prepare("coco", root, server, manifest)
    assert not (root / "coco" / "val2014").exists()
