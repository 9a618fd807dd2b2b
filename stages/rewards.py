"""SCST's rewards: CIDEr-D in Python, as the COCO caption toolkit computes it (no Java in the training
loop), CLIP-S through models.clip_score, their weighted sum, and the baselines subtracted from them."""

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from data.errors import InputError
from data.references import ImageId

REWARDS = ("cider", "clip", "cider+clip")
BASELINES = ("mean", "greedy")
# Tokens the COCO toolkit's PTB tokenizer step removes (pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS;
# spelled out here so that training does not import the toolkit).
PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
# What the PTB tokenizer makes a token of, in order of precedence (it splits clitics and punctuation,
# keeps abbreviations, numbers and hyphenated words whole).
_PTB_TOKEN = re.compile(
    r"""(?:[a-z]\.){2,}        # abbreviations: u.s., p.m.
    | \d+(?:[.:,]\d+)+        # numbers: 3.5, 5:30, 1,000
    | \w+(?=n't\b) | n't\b    # "can't" -> "ca n't"
    | '\w+                    # clitics: 's, 're, 'll
    | \w+(?:[-/]\w+)*         # words, hyphenated words, cat/dog
    | \.\.\. | -- | [^\w\s]   # punctuation and symbols
    """,
    re.VERBOSE,
)
# PTB's names for brackets (kept: the toolkit removes only their upper-case forms); quotes become `` and ''.
_PTB_RENAMED = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-", '"': "''"}


def normalize_caption(text: str) -> str:
    """A caption as the PTB tokenizer step leaves it: lowercase words, punctuation tokens removed."""
    tokens = (_PTB_RENAMED.get(token, token) for token in _PTB_TOKEN.findall(text.lower()))
    return " ".join(token for token in tokens if token not in PTB_PUNCTUATION)


def ngram_counts(words: Sequence[str], max_n: int = 4) -> Counter:
    """How often each n-gram (n = 1..max_n, as a tuple of words) occurs in `words`."""
    return Counter(tuple(words[i : i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1))


class CiderD:
    """CIDEr-D (Vedantam et al. 2015, coco-caption's Cider): tf-idf n-gram vectors for n = 1..4, counts
    clipped by the reference's, a Gaussian length penalty (sigma 6), the mean over n and references,
    times 10. Document frequencies come from the references given, once. Every reference's vector is
    precomputed into flat arrays keyed by n-gram hashes (compact for a large training set), and a batch
    of captions is scored with a few array operations."""

    def __init__(self, references: dict[ImageId, list[str]], max_n: int = 4, sigma: float = 6.0, progress: bool = False):
        """`references`: each image's reference captions, already normalized (see normalize_caption)."""
        if not references or not all(references.values()):
            raise InputError("CIDEr-D needs at least one reference caption for every image")
        self.max_n, self.sigma = max_n, sigma
        counts = [
            [ngram_counts(caption.split(), max_n) for caption in captions]
            for captions in tqdm(references.values(), desc="CIDEr-D references", disable=not progress)
        ]
        document_frequency: Counter = Counter()
        for image_counts in counts:
            document_frequency.update({hash(ngram) for ref in image_counts for ngram in ref})
        keys = np.fromiter(document_frequency.keys(), dtype=np.int64, count=len(document_frequency))
        log_df = np.log(np.maximum(1.0, np.fromiter(document_frequency.values(), dtype=np.float64)))
        order = keys.argsort()
        self.df_keys, self.df_log = keys[order], log_df[order]
        self.ref_len = math.log(len(references))  # log of the number of images, as coco-caption
        self.image_index = {image_id: index for index, image_id in enumerate(references)}
        refs = _NgramTable(self, [ref for image_counts in counts for ref in image_counts])
        self.ref_hashes, self.ref_weights, self.ref_norms, self.ref_lengths = refs.hashes, refs.weights, refs.norms, refs.lengths
        self.ref_entry_order = refs.order  # (n - 1) of each entry
        self.ref_of_entry = refs.owner  # the reference each entry belongs to
        refs_per_image = np.array([len(image_counts) for image_counts in counts])
        self.image_first_ref = np.concatenate(([0], np.cumsum(refs_per_image)))  # (images + 1,)
        self.ref_first_entry = refs.first_entry  # (refs + 1,)

    def log_df(self, hashes: np.ndarray) -> np.ndarray:
        """log(max(1, document frequency)) of each n-gram hash (0 for n-grams no reference has)."""
        positions = np.minimum(np.searchsorted(self.df_keys, hashes), len(self.df_keys) - 1)
        return np.where(self.df_keys[positions] == hashes, self.df_log[positions], 0.0)

    def score(self, image_id: ImageId, caption: str) -> float:
        """The CIDEr-D of one normalized caption against its image's references."""
        return self.scores([image_id], [caption])[0]

    def scores(self, image_ids: Sequence[ImageId], captions: Sequence[str]) -> list[float]:
        """CIDEr-D of each normalized caption against its image's references."""
        if len(image_ids) != len(captions):
            raise ValueError(f"{len(image_ids)} image ids for {len(captions)} captions")
        unknown = [image_id for image_id in image_ids if image_id not in self.image_index]
        if unknown:
            raise InputError(f"CIDEr-D: image {unknown[0]!r} has no references")
        if not captions:
            return []
        images = np.array([self.image_index[image_id] for image_id in image_ids])
        candidates = _NgramTable(self, [ngram_counts(caption.split(), self.max_n) for caption in captions])
        # Every (caption, reference of its image) pair is a row; each caption's rows are consecutive.
        first_ref, refs_per_caption = self.image_first_ref[images], np.diff(self.image_first_ref)[images]
        caption_of_row = np.repeat(np.arange(len(captions)), refs_per_caption)
        ref_of_row = _ranges(first_ref, refs_per_caption)
        # The reference n-gram entries of every row, and the caption's weight of the same n-gram (0 if absent).
        entries_per_row = np.diff(self.ref_first_entry)[ref_of_row]
        entry = _ranges(self.ref_first_entry[ref_of_row], entries_per_row)
        row_of_entry = np.repeat(np.arange(len(ref_of_row)), entries_per_row)
        caption_weight = candidates.weight_of(caption_of_row[row_of_entry], self.ref_hashes[entry])
        reference_weight = self.ref_weights[entry]
        clipped = np.minimum(caption_weight, reference_weight) * reference_weight
        cells = row_of_entry * self.max_n + self.ref_entry_order[entry]
        similarity = np.bincount(cells, weights=clipped, minlength=len(ref_of_row) * self.max_n)
        similarity = similarity.reshape(-1, self.max_n)  # (rows, max_n)
        denominator = candidates.norms[caption_of_row] * self.ref_norms[ref_of_row]
        similarity = np.divide(similarity, denominator, out=similarity, where=denominator != 0)
        delta = candidates.lengths[caption_of_row] - self.ref_lengths[ref_of_row]
        similarity *= np.exp(-(delta**2) / (2 * self.sigma**2))[:, None]
        per_caption = np.zeros((len(captions), self.max_n))
        np.add.at(per_caption, caption_of_row, similarity)
        return list(per_caption.mean(axis=1) / refs_per_caption * 10.0)


class _NgramTable:
    """The tf-idf n-gram vectors of several captions as flat arrays, entries grouped by caption."""

    def __init__(self, cider: CiderD, counts: list[Counter]):
        sizes = np.fromiter((len(count) for count in counts), dtype=np.int64, count=len(counts))
        self.first_entry = np.concatenate(([0], np.cumsum(sizes)))
        grams = [gram for count in counts for gram in count]
        self.hashes = np.fromiter((hash(gram) for gram in grams), dtype=np.int64, count=len(grams))
        self.order = np.fromiter((len(gram) - 1 for gram in grams), dtype=np.int64, count=len(grams))
        term_freq = np.fromiter((tf for count in counts for tf in count.values()), dtype=np.float64, count=len(grams))
        self.owner = np.repeat(np.arange(len(counts)), sizes)
        self.weights = term_freq * (cider.ref_len - cider.log_df(self.hashes))
        cells = self.owner * cider.max_n + self.order
        squares = np.bincount(cells, weights=self.weights**2, minlength=len(counts) * cider.max_n)
        self.norms = np.sqrt(squares).reshape(len(counts), cider.max_n)
        # coco-caption's "length" counts bigrams (its n == 1 is the second order); kept for equal scores.
        self.lengths = np.bincount(self.owner, weights=term_freq * (self.order == 1), minlength=len(counts))
        # A key per (caption, n-gram), sorted, to look up a caption's weight of an n-gram.
        keys = _pair_key(self.owner, self.hashes)
        self.key_order = keys.argsort()
        self.sorted_keys = keys[self.key_order]

    def weight_of(self, captions: np.ndarray, hashes: np.ndarray) -> np.ndarray:
        """The weight each caption gives each n-gram hash (0 where it does not have it)."""
        if not len(self.sorted_keys):
            return np.zeros(len(hashes))
        keys = _pair_key(captions, hashes)
        positions = np.minimum(np.searchsorted(self.sorted_keys, keys), len(self.sorted_keys) - 1)
        found = self.sorted_keys[positions] == keys
        return np.where(found, self.weights[self.key_order[positions]], 0.0)


def _pair_key(owners: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """One 64-bit key per (caption, n-gram hash): the hash shifted by a large odd multiple of the caption
    (wrapping arithmetic; two pairs meet only by a 2**-64 chance, as two n-gram hashes can)."""
    return hashes.view(np.uint64) + owners.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of range(start, start + length) for each pair, as one array."""
    offsets = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    return np.arange(lengths.sum()) + offsets


def mean_of_others(rewards: torch.Tensor) -> torch.Tensor:
    """Each sample's baseline: the mean reward of its image's other samples (Luo 2020). (B, K) -> (B, K)."""
    num_samples = rewards.shape[1]
    if num_samples < 2:
        raise InputError("--baseline mean needs --scst_samples of at least 2 (or use --baseline greedy)")
    return (rewards.sum(dim=1, keepdim=True) - rewards) / (num_samples - 1)


def policy_gradient_loss(
    token_log_probs: torch.Tensor, token_mask: torch.Tensor, advantages: torch.Tensor
) -> torch.Tensor:
    """-sum((r - b) * log p(token)) over the sampled tokens, divided by their number (EOS counted).

    token_log_probs, token_mask: (N, T); advantages: (N,), one per sampled caption, no gradient."""
    weighted = token_log_probs * token_mask * advantages.detach().unsqueeze(1)
    return -weighted.sum() / token_mask.sum().clamp(min=1)
