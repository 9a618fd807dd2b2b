"""Caption datasets over a feature file: captions tokenized once (and cached), EOS appended,
padded per batch by `collate_captions`. Nothing here changes the dataset after it is built."""

import hashlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from data.atomic import atomic_write
from data.errors import InputError, utf8
from data.features import FEATURES_KEY, FeatureFile
from data.store import CaptionTable

CACHE_ENV = "CLIPCAP_PLUS_CACHE_DIR"
CACHE_FORMAT = 2  # bump when the cached layout changes


def default_cache_dir() -> Path:
    """$CLIPCAP_PLUS_CACHE_DIR, else ~/.cache/clipcap-plus (never beside the user's data)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clipcap-plus"


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything that decides the token ids: vocabulary, merges, normalizer, EOS."""
    digest = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(str(tokenizer.eos_token_id).encode())
    return digest.hexdigest()[:16]


def captions_fingerprint(captions: Sequence[dict]) -> str:
    """A hash of the caption texts in order: the only part of a feature file that tokens depend on.
    A store's captions carry theirs (from its shards' checksums), so their texts are not read for it."""
    if isinstance(captions, CaptionTable):
        return captions.key
    digest = hashlib.sha256()
    for number, caption in enumerate(captions):  # a pickle's texts come unchecked; a parquet store's are UTF-8
        digest.update(utf8(caption["caption"], f"caption {number} (image_id {caption['image_id']!r})"))
        digest.update(b"\0")  # separator, so ["ab", "c"] and ["a", "bc"] differ
    return digest.hexdigest()[:16]


def caption_texts(captions: Sequence[dict]) -> list[str]:
    """The caption texts, in order."""
    return captions.text_list() if isinstance(captions, CaptionTable) else [caption["caption"] for caption in captions]


def caption_rows(captions: Sequence[dict]) -> torch.Tensor:
    """Each caption's feature row, (num_captions,) int64."""
    if isinstance(captions, CaptionTable):
        return torch.from_numpy(captions.rows)
    return torch.tensor([caption[FEATURES_KEY] for caption in captions], dtype=torch.int64)


@dataclass
class TokenizedCaptions:
    """All captions' token ids in one flat tensor; caption i is tokens[offsets[i]:offsets[i + 1]]."""

    tokens: torch.Tensor  # (total_tokens,) int32, EOS closes every caption
    offsets: torch.Tensor  # (num_captions + 1,) int64
    key: str = ""  # the cache key: names the tokenizer and the caption texts these tokens came from

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def is_consistent(self, num_captions: int) -> bool:
        """Whether the tensors describe `num_captions` captions (a cache file may be stale or cut)."""
        return (
            self.offsets.dim() == 1
            and len(self) == num_captions
            and int(self.offsets[0]) == 0
            and int(self.offsets[-1]) == self.tokens.numel()
            and bool((self.lengths() > 0).all())
        )


def drop_long_captions(features: FeatureFile, max_chars: int) -> tuple[FeatureFile, int]:
    """The feature file without its captions longer than `max_chars` characters, and how many those were.
    Tokenizing a pathological caption (a pickle can reference one long string thousands of times) costs
    gigabytes; no real caption is that long."""
    captions = features.captions
    if isinstance(captions, CaptionTable):  # column-wise: a store's captions never become dicts
        mask = captions.char_lengths() <= max_chars
        kept = captions if mask.all() else captions.select(mask, f"max_chars={max_chars}")
    else:
        kept = [caption for caption in captions if len(caption["caption"]) <= max_chars]
    return replace(features, captions=kept), len(captions) - len(kept)


def check_captions_have_tokens(token_counts: torch.Tensor, tokenizer: PreTrainedTokenizerBase, model: str) -> None:
    """Refuse captions most of which `tokenizer` turns into nothing, token_counts (M,) not counting special
    tokens: `model` (the LM, a text tower) would learn from no text (the LM to say EOS alone)."""
    empty = int((token_counts == 0).sum())
    if empty > token_counts.numel() / 2:
        raise InputError(
            f"tokenizer {tokenizer.name_or_path!r} turns {empty} of {token_counts.numel()} captions into no tokens; "
            f"the captions are empty, its vocabulary did not load, or it is not the {model}'s tokenizer"
        )


def tokenize_captions(
    captions: Sequence[dict], tokenizer: PreTrainedTokenizerBase, progress: bool = False
) -> TokenizedCaptions:
    """Tokenize every caption text and append EOS."""
    texts = caption_texts(captions)
    chunk = 10_000  # the fast tokenizer batches internally; chunks keep the progress bar moving
    sequences: list[list[int]] = []
    for start in tqdm(range(0, len(texts), chunk), desc="tokenizing captions", disable=not progress):
        sequences += tokenizer(texts[start : start + chunk], add_special_tokens=False)["input_ids"]
    lengths = torch.tensor([len(ids) + 1 for ids in sequences], dtype=torch.int64)
    offsets = torch.cat((torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)))
    flat = [token for ids in sequences for token in (*ids, tokenizer.eos_token_id)]
    return TokenizedCaptions(torch.tensor(flat, dtype=torch.int32), offsets)


def _read_cached_tokens(path: Path, num_captions: int, key: str) -> TokenizedCaptions | None:
    """The cached arrays memory-mapped (pages load as items are read), or None if missing or damaged."""
    try:
        tokens = np.load(Path(f"{path}.tokens.npy"), mmap_mode="r", allow_pickle=False)
        offsets = np.load(Path(f"{path}.offsets.npy"), mmap_mode="r", allow_pickle=False)
        if tokens.dtype != np.int32 or offsets.dtype != np.int64 or tokens.ndim != 1 or len(tokens) == 0:
            return None
        with warnings.catch_warnings():  # torch warns of read-only arrays; nothing writes to these
            warnings.simplefilter("ignore", UserWarning)
            tokenized = TokenizedCaptions(torch.from_numpy(tokens), torch.from_numpy(offsets), key)
        # The offsets are checked whole (8 bytes a caption); the tokens only at their ends.
        return tokenized if tokenized.is_consistent(num_captions) else None
    except (OSError, ValueError):  # a damaged cache file is rebuilt, never trusted and never fatal
        return None


def load_or_tokenize(
    captions: Sequence[dict],
    tokenizer: PreTrainedTokenizerBase,
    cache_dir: str | os.PathLike | None = None,
    write_cache: bool = True,
    progress: bool = False,
) -> TokenizedCaptions:
    """Tokenized captions from the cache (keyed by tokenizer and caption texts), else tokenize and cache.
    The cache is two flat .npy arrays (tokens, offsets), memory-mapped when read."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = f"tokens-v{CACHE_FORMAT}-{tokenizer_fingerprint(tokenizer)}-{captions_fingerprint(captions)}"
    path = cache_dir / key
    cached = _read_cached_tokens(path, len(captions), key)
    if cached is not None:
        return cached  # checked by check_captions_have_tokens before it was cached
    tokenized = tokenize_captions(captions, tokenizer, progress)
    check_captions_have_tokens(tokenized.lengths() - 1, tokenizer, "LM")  # EOS not counted
    tokenized.key = key
    if write_cache:  # each file atomically; both must be there and agree to be used
        for suffix, array in ((".tokens.npy", tokenized.tokens), (".offsets.npy", tokenized.offsets)):
            with atomic_write(Path(f"{path}{suffix}")) as handle:
                np.save(handle, array.numpy(), allow_pickle=False)
    return tokenized


@dataclass
class CaptionBatch:
    """A padded batch: right-padded tokens and the mask of real tokens."""

    features: torch.Tensor  # (B, D) float32, or (B, T, D) for token features
    tokens: torch.Tensor  # (B, T) int64, T = longest caption in the batch
    attention_mask: torch.Tensor  # (B, T) int64, 1 on real tokens (EOS included), 0 on padding

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device) -> "CaptionBatch":
        """The batch on `device` (non-blocking from pinned memory)."""
        return CaptionBatch(
            self.features.to(device, non_blocking=True),
            self.tokens.to(device, non_blocking=True),
            self.attention_mask.to(device, non_blocking=True),
        )


class CaptionDataset(Dataset):
    """One item per caption: (its image's feature row (D,) or (T, D), its token ids (L,) ending in EOS)."""

    def __init__(self, features: FeatureFile, tokenized: TokenizedCaptions, max_tokens: int | None = None):
        if len(tokenized) != len(features.captions):
            raise ValueError(f"{len(tokenized)} tokenized captions for {len(features.captions)} captions")
        self.embeddings = features.embeddings  # (N, D), shared, never modified
        self.rows = caption_rows(features.captions)  # (num_captions,) int64
        self.tokenized = tokenized
        self.max_tokens = max_tokens  # the LM's context minus the prefix; longer captions are cut

    def __len__(self) -> int:
        return len(self.tokenized)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = int(self.tokenized.offsets[index]), int(self.tokenized.offsets[index + 1])
        if self.max_tokens is not None:
            end = min(end, start + self.max_tokens)
        # Slices are views: reading an item copies nothing and changes nothing.
        return self.embeddings[self.rows[index]], self.tokenized.tokens[start:end]


@dataclass(frozen=True)
class CaptionCollator:
    """collate_fn: stacks features and right-pads tokens to the batch's longest caption."""

    pad_token_id: int  # any id works (padding is masked out of attention and loss); EOS reads best

    def __call__(self, items: list[tuple[torch.Tensor, torch.Tensor]]) -> CaptionBatch:
        features = torch.stack([feature for feature, _ in items])  # (B, D) or (B, T, D)
        longest = max(tokens.numel() for _, tokens in items)
        tokens = torch.full((len(items), longest), self.pad_token_id, dtype=torch.int64)  # (B, T)
        attention_mask = torch.zeros((len(items), longest), dtype=torch.int64)
        for row, (_, caption) in enumerate(items):
            tokens[row, : caption.numel()] = caption
            attention_mask[row, : caption.numel()] = 1
        return CaptionBatch(features, tokens, attention_mask)


def build_caption_dataset(
    features: FeatureFile,
    tokenizer: PreTrainedTokenizerBase,
    max_tokens: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    write_cache: bool = True,
    progress: bool = False,
) -> CaptionDataset:
    """The dataset of a feature file's captions, tokenized through the cache."""
    tokenized = load_or_tokenize(features.captions, tokenizer, cache_dir, write_cache, progress)
    return CaptionDataset(features, tokenized, max_tokens)
