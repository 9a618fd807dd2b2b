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
    times 10. Document frequencies come from the references given, once; each reference's vector is
    precomputed, as flat arrays keyed by n-gram hashes, so a large training set stays compact."""

    def __init__(self, references: dict[ImageId, list[str]], max_n: int = 4, sigma: float = 6.0, progress: bool = False):
        """`references`: each image's reference captions, already normalized (see normalize_caption)."""
        if not references:
            raise InputError("CIDEr-D needs reference captions")
        self.max_n, self.sigma = max_n, sigma
        counts = {
            image_id: [ngram_counts(caption.split(), max_n) for caption in captions]
            for image_id, captions in tqdm(references.items(), desc="CIDEr-D references", disable=not progress)
        }
        document_frequency: Counter = Counter()
        for image_counts in counts.values():
            document_frequency.update({hash(ngram) for ref in image_counts for ngram in ref})
        keys = np.fromiter(document_frequency.keys(), dtype=np.int64, count=len(document_frequency))
        order = keys.argsort()
        self.df_keys = keys[order]
        log_df = np.log(np.maximum(1.0, np.fromiter(document_frequency.values(), dtype=np.float64)))
        self.df_log = log_df[order]
        self.ref_len = math.log(len(references))  # log of the number of images, as coco-caption
        self.references = {image_id: self._reference_arrays(refs) for image_id, refs in counts.items()}

    def _log_df(self, hashes: np.ndarray) -> np.ndarray:
        """log(max(1, document frequency)) of each n-gram hash (0 for n-grams no reference has)."""
        positions = np.minimum(np.searchsorted(self.df_keys, hashes), len(self.df_keys) - 1)
        return np.where(self.df_keys[positions] == hashes, self.df_log[positions], 0.0)

    def _vector(self, counts: Counter) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
        """(sorted hashes, tf-idf weights, n - 1 of each, norm per n, length) of one caption's n-grams."""
        grams = list(counts)
        hashes = np.fromiter((hash(gram) for gram in grams), dtype=np.int64, count=len(grams))
        orders = np.fromiter((len(gram) - 1 for gram in grams), dtype=np.int64, count=len(grams))
        term_freq = np.fromiter(counts.values(), dtype=np.float64, count=len(grams))
        weights = term_freq * (self.ref_len - self._log_df(hashes))
        norms = np.sqrt(np.bincount(orders, weights=weights**2, minlength=self.max_n))
        # coco-caption's "length" counts bigrams (its n == 1 is the second order), kept for equal scores.
        length = int(term_freq[orders == 1].sum())
        sort = hashes.argsort()
        return hashes[sort], weights[sort], orders[sort], norms, length

    def _reference_arrays(self, refs: list[Counter]) -> dict[str, np.ndarray]:
        vectors = [self._vector(ref) for ref in refs]
        return {
            "hashes": np.concatenate([vector[0] for vector in vectors]),
            "weights": np.concatenate([vector[1] for vector in vectors]),
            # the (reference, n) cell each entry adds to: reference * max_n + (n - 1)
            "cells": np.concatenate([index * self.max_n + vector[2] for index, vector in enumerate(vectors)]),
            "norms": np.stack([vector[3] for vector in vectors]),  # (R, max_n)
            "lengths": np.array([vector[4] for vector in vectors], dtype=np.float64),  # (R,)
        }

    def score(self, image_id: ImageId, caption: str) -> float:
        """The CIDEr-D of one normalized caption against its image's references."""
        refs = self.references.get(image_id)
        if refs is None:
            raise InputError(f"CIDEr-D: image {image_id!r} has no references")
        hashes, weights, _, norms, length = self._vector(ngram_counts(caption.split(), self.max_n))
        num_refs = len(refs["lengths"])
        if len(hashes):
            positions = np.minimum(np.searchsorted(hashes, refs["hashes"]), len(hashes) - 1)
            candidate = np.where(hashes[positions] == refs["hashes"], weights[positions], 0.0)
        else:
            candidate = np.zeros_like(refs["weights"])
        clipped = np.minimum(candidate, refs["weights"]) * refs["weights"]
        similarity = np.bincount(refs["cells"], weights=clipped, minlength=num_refs * self.max_n)
        similarity = similarity.reshape(num_refs, self.max_n)
        denominator = norms * refs["norms"]  # (R, max_n)
        similarity = np.divide(similarity, denominator, out=similarity, where=denominator != 0)
        penalty = np.exp(-((length - refs["lengths"]) ** 2) / (2 * self.sigma**2))  # (R,)
        return float((similarity * penalty[:, None]).sum(axis=0).mean() / num_refs * 10.0)

    def scores(self, image_ids: Sequence[ImageId], captions: Sequence[str]) -> list[float]:
        """CIDEr-D of each normalized caption against its image's references."""
        return [self.score(image_id, caption) for image_id, caption in zip(image_ids, captions, strict=True)]


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
