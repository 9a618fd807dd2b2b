"""Webdataset input: tar shards (img2dataset's output) streamed sample by sample, through the
`webdataset` library, so local paths, brace patterns and `pipe:` URLs all work as it provides them.

Shards are split over torchrun ranks (by the caller) and over DataLoader workers (here); a worker
yields batches that never mix shards, and closes each shard with a batch marked `last`, so the
process that encodes knows when a shard's results are whole. Nothing is kept per sample beyond
its decoded pixels until its batch is yielded.
"""

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from types import ModuleType

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from data.errors import InputError
from data.images import ImageReadError, decode_rgb


def webdataset_library() -> ModuleType:
    """The webdataset package, imported only when shards are read: folder input runs without it (the GPU
    machine has none)."""
    try:
        import webdataset
    except ImportError as error:
        raise InputError(
            f"reading webdataset shards needs the webdataset package ({error}): pip install webdataset"
        ) from None
    return webdataset


def expand_shard_urls(pattern: str) -> list[str]:
    """`shards/{00000..00999}.tar` (or several joined by `::`) -> the list of shard URLs, in order."""
    urls = webdataset_library().shardlists.expand_urls(pattern)
    if not urls or any(not url for url in urls):
        raise InputError(f"--input {pattern!r}: names no shard")
    if len(set(urls)) != len(urls):
        raise InputError(f"--input {pattern!r}: names a shard twice")
    return urls


@dataclass
class ShardBatch:
    """Up to batch_size decoded samples of one shard, and the samples of it that were skipped."""

    shard: int  # the shard's position in the --input list
    url: str
    keys: list[str] = field(default_factory=list)  # one per pixel row
    captions: list[str] = field(default_factory=list)
    pixels: torch.Tensor | None = None  # (b, 3, H, W)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    last: bool = False  # the shard's final batch
    # With `last`: why the shard could not be read to its end (an unreadable URL, a truncated tar, a failed
    # pipe: command); such a shard is not done, and --resume reads it again.
    error: str | None = None


def group_members(members: Iterable[dict]) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """Consecutive tar members with one key -> (key, [(extension, data), ...]), keyed as webdataset keys them
    (the name up to its first dot, extensions lower-cased); unlike its group_by_keys, a repeated member name
    stays in its sample, for the caller to refuse, instead of ending the shard."""
    base_plus_ext = webdataset_library().tariterators.base_plus_ext
    named = ((*base_plus_ext(member["fname"]), member["data"]) for member in members)
    samples = itertools.groupby((entry for entry in named if entry[0] is not None), key=lambda entry: entry[0])
    for key, entries in samples:
        yield key, [(extension.lower(), data) for _, extension, data in entries]


def _leaves_shard(key: str) -> bool:
    """Whether a member's key is an absolute path or climbs with `..` (`../x`, `/etc/x`)."""
    path = PurePosixPath(key)
    return path.is_absolute() or ".." in path.parts


def pass_through(batch: ShardBatch) -> ShardBatch:
    """collate_fn for batches the dataset makes itself (a module function, so workers can pickle it)."""
    return batch


class WebdatasetImages(IterableDataset):
    """Decoded, preprocessed samples of the given shards, in ShardBatch-es; bad samples travel as reasons."""

    def __init__(
        self,
        shards: list[tuple[int, str]],
        image_key: str,
        caption_key: str,
        preprocess: Callable[[Image.Image], torch.Tensor],
        resize_dim: int | None,
        batch_size: int,
    ):
        self.shards, self.image_key, self.caption_key = shards, image_key.lower(), caption_key.lower()
        self.preprocess, self.resize_dim, self.batch_size = preprocess, resize_dim, batch_size

    def __iter__(self) -> Iterator[ShardBatch]:
        worker = get_worker_info()
        mine = self.shards if worker is None else self.shards[worker.id :: worker.num_workers]
        for number, url in mine:
            yield from self._read_shard(number, url)

    def _read_shard(self, number: int, url: str) -> Iterator[ShardBatch]:
        library = webdataset_library()
        errors: list[str] = []
        exit_status: list[int] = []  # a pipe: URL's failed command, whatever its output did to the tar reader

        def stop(error: Exception) -> bool:  # webdataset's handler: note why, and end this shard
            if isinstance(error, OSError) and getattr(stream, "status", None):  # webdataset's Pipe
                exit_status.append(stream.status)  # its message would repeat Popen's arguments
            else:
                errors.append((str(error.args[0]) if error.args else type(error).__name__).split(" @ ")[0])
            return False

        batch = ShardBatch(number, url)
        decoded: list[torch.Tensor] = []
        try:
            stream = library.gopen(url)
        except Exception as error:  # a missing file, a pipe that cannot start
            yield ShardBatch(number, url, last=True, error=f"cannot open ({error})")
            return
        try:
            for key, members in group_members(library.tariterators.tar_file_iterator(stream, handler=stop)):
                self._add(batch, decoded, key, members)
                if len(batch.keys) + len(batch.failures) >= self.batch_size:
                    yield self._finish(batch, decoded)
                    batch, decoded = ShardBatch(number, url), []
        except Exception as error:  # e.g. not a tar file at all
            stop(error)
        finally:
            try:
                stream.close()  # a pipe: URL reports its command's failure here
            except Exception as error:
                stop(error)
        batch.last = True
        batch.error = f"its command exited with status {exit_status[0]}" if exit_status else "; ".join(errors) or None
        yield self._finish(batch, decoded)

    def _add(self, batch: ShardBatch, decoded: list[torch.Tensor], key: str, members: list[tuple[str, bytes]]) -> None:
        if _leaves_shard(key):  # as an image id, it would name a path outside any images directory
            batch.failures.append((key, "member name is absolute or has '..'"))
            return
        extensions = [extension for extension, _ in members]
        wanted = (self.image_key, self.caption_key)
        if repeated := [name for name in wanted if extensions.count(name) > 1]:  # which one is the sample's?
            batch.failures.append((key, f"{extensions.count(repeated[0])} '{repeated[0]}' members"))
            return
        sample = dict(members)
        missing = [name for name in wanted if name not in sample]
        if missing:
            batch.failures.append((key, f"no '{', '.join(missing)}' member"))
            return
        try:
            caption = sample[self.caption_key].decode("utf-8").strip()
        except UnicodeDecodeError:
            batch.failures.append((key, "caption is not UTF-8 text"))
            return
        if not caption:
            batch.failures.append((key, "empty caption"))
            return
        try:
            image = decode_rgb(sample[self.image_key], key, self.resize_dim)
        except ImageReadError as error:
            batch.failures.append((key, error.reason))
            return
        batch.keys.append(key)
        batch.captions.append(caption)
        decoded.append(self.preprocess(image))

    @staticmethod
    def _finish(batch: ShardBatch, decoded: list[torch.Tensor]) -> ShardBatch:
        batch.pixels = torch.stack(decoded) if decoded else None  # (b, 3, H, W)
        return batch
