"""Caption datasets over a feature file: captions tokenized once (and cached), EOS appended,
padded per batch by `collate_captions`. Nothing here changes the dataset after it is built."""

import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import Dataset
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from data.atomic import torch_save_atomic
from data.errors import InputError
from data.features import FEATURES_KEY, FeatureFile

CACHE_ENV = "CLIPCAP_PLUS_CACHE_DIR"
CACHE_FORMAT = 1  # bump when the cached layout changes


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


def captions_fingerprint(captions: list[dict]) -> str:
    """A hash of the caption texts in order: the only part of a feature file that tokens depend on."""
    digest = hashlib.sha256()
    for caption in captions:
        digest.update(caption["caption"].encode())
        digest.update(b"\0")  # separator, so ["ab", "c"] and ["a", "bc"] differ
    return digest.hexdigest()[:16]


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
    kept = [caption for caption in features.captions if len(caption["caption"]) <= max_chars]
    return replace(features, captions=kept), len(features.captions) - len(kept)


def check_captions_have_tokens(tokenized: "TokenizedCaptions", tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a tokenizer that turns most captions into nothing: the model would learn to say EOS alone."""
    empty = int((tokenized.lengths() == 1).sum())  # EOS alone
    if empty > len(tokenized) / 2:
        raise InputError(
            f"tokenizer {tokenizer.name_or_path!r} turns {empty} of {len(tokenized)} captions into no tokens; "
            "its vocabulary did not load, or it is not the LM's tokenizer"
        )


def tokenize_captions(
    captions: list[dict], tokenizer: PreTrainedTokenizerBase, progress: bool = False
) -> TokenizedCaptions:
    """Tokenize every caption text and append EOS."""
    texts = [caption["caption"] for caption in captions]
    chunk = 10_000  # the fast tokenizer batches internally; chunks keep the progress bar moving
    sequences: list[list[int]] = []
    for start in tqdm(range(0, len(texts), chunk), desc="tokenizing captions", disable=not progress):
        sequences += tokenizer(texts[start : start + chunk], add_special_tokens=False)["input_ids"]
    lengths = torch.tensor([len(ids) + 1 for ids in sequences], dtype=torch.int64)
    offsets = torch.cat((torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)))
    flat = [token for ids in sequences for token in (*ids, tokenizer.eos_token_id)]
    return TokenizedCaptions(torch.tensor(flat, dtype=torch.int32), offsets)


def load_or_tokenize(
    captions: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    cache_dir: str | os.PathLike | None = None,
    write_cache: bool = True,
    progress: bool = False,
) -> TokenizedCaptions:
    """Tokenized captions from the cache (keyed by tokenizer and caption texts), else tokenize and cache."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = f"tokens-v{CACHE_FORMAT}-{tokenizer_fingerprint(tokenizer)}-{captions_fingerprint(captions)}"
    path = cache_dir / f"{key}.pt"
    if path.is_file():
        try:
            cached = torch.load(path, weights_only=True)
            tokenized = TokenizedCaptions(cached["tokens"], cached["offsets"], key)
            if tokenized.is_consistent(len(captions)):
                return tokenized  # checked by check_captions_have_tokens before it was cached
        except Exception:  # a damaged cache file is rebuilt, never trusted and never fatal
            pass
    tokenized = tokenize_captions(captions, tokenizer, progress)
    check_captions_have_tokens(tokenized, tokenizer)
    tokenized.key = key
    if write_cache:
        torch_save_atomic({"tokens": tokenized.tokens, "offsets": tokenized.offsets}, path)
    return tokenized


@dataclass
class CaptionBatch:
    """A padded batch: right-padded tokens and the mask of real tokens."""

    features: torch.Tensor  # (B, D) float32
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
    """One item per caption: (its image's feature row (D,), its token ids (L,) ending in EOS)."""

    def __init__(self, features: FeatureFile, tokenized: TokenizedCaptions, max_tokens: int | None = None):
        if len(tokenized) != len(features.captions):
            raise ValueError(f"{len(tokenized)} tokenized captions for {len(features.captions)} captions")
        self.embeddings = features.embeddings  # (N, D), shared, never modified
        self.rows = torch.tensor([caption[FEATURES_KEY] for caption in features.captions], dtype=torch.int64)
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
        features = torch.stack([feature for feature, _ in items])  # (B, D)
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
