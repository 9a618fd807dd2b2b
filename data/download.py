"""Resumable downloads and safe zip extraction, standard library only: a file is fetched into `<name>.part`
(continued with an HTTP Range request where the server honours it), its size and checksum verified, then
renamed into place; a zip is checked member by member (names inside the target, CRCs) as it is extracted."""

import hashlib
import http.client
import os
import stat
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from data.errors import InputError

CHUNK = 1 << 20  # bytes read and hashed at a time
TIMEOUT_S = 60  # a stalled server is a dropped connection, not a hang


@dataclass(frozen=True)
class RemoteFile:
    """One file of a data set: where it lives, what it must be, and (for an image zip) how many images it holds.

    `checksum` is `md5:<hex>` or `sha256:<hex>`; None where nobody publishes one (then only the size is checked).
    `size` is None where unknown (then the server's length is checked)."""

    name: str
    url: str | None
    size: int | None = None
    checksum: str | None = None
    images: int | None = None


def file_url(remote: RemoteFile, mirror: str | None) -> str:
    """The URL to fetch `remote` from: its own, or `mirror/<file name>`."""
    if mirror:
        return f"{mirror.rstrip('/')}/{remote.name}"
    if remote.url is None:
        raise InputError(f"{remote.name}: has no public URL; give the local file")
    return remote.url


def file_digest(path: Path, algorithm: str) -> str:
    """The hex digest of `path`'s bytes, with a progress bar (a 13 GB zip takes a while)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle, tqdm(
        total=path.stat().st_size, unit="B", unit_scale=True, desc=f"checking {path.name}", leave=False
    ) as bar:
        while block := handle.read(CHUNK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def verify_file(path: Path, remote: RemoteFile, source: str) -> None:
    """`path` has `remote`'s size and checksum, else an InputError naming `source` and the mismatch."""
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:
        raise InputError(f"{source}: size mismatch, {size} bytes where {remote.size} are expected")
    if remote.checksum is not None:
        algorithm, expected = remote.checksum.split(":", 1)
        found = file_digest(path, algorithm)
        if found != expected.lower():
            raise InputError(f"{source}: {algorithm} checksum mismatch, {found} where {expected} is expected")


def _open(url: str, offset: int) -> http.client.HTTPResponse | None:
    """The server's response to a GET of `url` from byte `offset` on, None where it has no bytes past `offset`
    (HTTP 416: the partial file may be whole); an HTTP or connection error is one line."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # nothing past the partial file: it may be whole already
            return None
        raise InputError(f"{url}: HTTP error {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError) as error:
        raise InputError(f"{url}: cannot connect ({getattr(error, 'reason', error)})") from None


def _resumed_from(response: http.client.HTTPResponse, offset: int) -> int:
    """Where the body of `response` starts: `offset` when the server honoured the Range, 0 when it sent it all."""
    if offset and response.status == 206:
        content_range = response.headers.get("Content-Range", "")  # bytes START-END/TOTAL
        if content_range.startswith(f"bytes {offset}-"):
            return offset
    return 0


def download(remote: RemoteFile, directory: Path, mirror: str | None = None) -> Path:
    """`directory/<name>`, fetched (or continued from `<name>.part`) and verified; a verified file is kept."""
    target = directory / remote.name
    url = file_url(remote, mirror)
    if target.exists():
        try:
            verify_file(target, remote, str(target))
        except InputError as error:
            raise InputError(f"{error}; delete it to download it again") from None
        return target
    directory.mkdir(parents=True, exist_ok=True)
    part = directory / f"{remote.name}.part"
    offset = part.stat().st_size if part.exists() else 0
    response = _open(url, offset)
    if response is not None:
        with response:
            start = _resumed_from(response, offset)
            length = response.headers.get("Content-Length")
            total = start + int(length) if length is not None else remote.size
            _receive(response, part, start, total, url)
    try:
        verify_file(part, remote, url)
    except InputError:
        part.unlink()  # continuing a wrong file cannot make it right: the next run starts afresh
        raise
    os.replace(part, target)  # the name appears only once the bytes are verified
    return target


def _receive(response: http.client.HTTPResponse, part: Path, start: int, total: int | None, url: str) -> None:
    """Write the body of `response` into `part` from byte `start` (0 truncates it).
    A connection that ends early is an InputError that keeps `part` for the next run to continue."""
    written = start
    with open(part, "r+b" if start else "wb") as handle, tqdm(
        total=total, initial=start, unit="B", unit_scale=True, desc=part.name[: -len(".part")]
    ) as bar:
        handle.seek(start)
        handle.truncate()
        try:
            while block := response.read(CHUNK):
                handle.write(block)
                written += len(block)
                bar.update(len(block))
        except (http.client.HTTPException, OSError):
            pass  # an early end, told below by the byte count
    if total is not None and written < total:
        raise InputError(
            f"{url}: connection dropped after {written} of {total} bytes; re-run the same command to resume "
            f"from {part}"
        )


def _member_path(info: zipfile.ZipInfo, zip_name: str) -> PurePosixPath:
    """A member's name as a relative path; an absolute name, a `..` or a link is an InputError."""
    name = info.filename.replace("\\", "/")
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise InputError(f"{zip_name}: member {info.filename!r} would land outside the target; nothing extracted")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise InputError(f"{zip_name}: member {info.filename!r} is a symbolic link; nothing extracted")
    return path


def zip_members(zip_path: Path, suffix: str) -> dict[str, zipfile.ZipInfo]:
    """The files of `zip_path` to extract by the name they get (their base name), those ending in `suffix`
    (case aside) outside `__MACOSX/`; every member's name is checked first, and two files of one name refused."""
    try:
        with zipfile.ZipFile(zip_path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError) as error:
        raise InputError(f"{zip_path}: not a readable zip ({error})") from None
    chosen: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        path = _member_path(info, str(zip_path))
        if info.is_dir() or not path.parts or path.parts[0] == "__MACOSX" or not path.name.lower().endswith(suffix):
            continue
        if path.name in chosen:
            raise InputError(f"{zip_path}: two members named {path.name} ({chosen[path.name].filename}, {info.filename})")
        chosen[path.name] = info
    return chosen


def read_member(zip_path: Path, info: zipfile.ZipInfo) -> bytes:
    """One member's bytes, its CRC checked."""
    try:
        with zipfile.ZipFile(zip_path) as archive:
            return archive.read(info)
    except (zipfile.BadZipFile, EOFError) as error:
        raise InputError(f"{zip_path}: corrupt member {info.filename} ({error})") from None


def extract_members(zip_path: Path, members: dict[str, zipfile.ZipInfo], directory: Path) -> None:
    """Write each member (name -> ZipInfo) into `directory/<name>`, its CRC checked as it is read."""
    try:
        with zipfile.ZipFile(zip_path) as archive:
            for name, info in tqdm(members.items(), desc=f"extracting {zip_path.name}", unit="file"):
                with archive.open(info) as source, open(directory / name, "wb") as target:
                    while block := source.read(CHUNK):
                        target.write(block)
    except (zipfile.BadZipFile, EOFError) as error:  # a bad CRC or a truncated member
        raise InputError(f"{zip_path}: corrupt member ({error}); nothing extracted") from None
