"""SCST's rewards: CIDEr-D in Python, as the COCO caption toolkit computes it (no Java in the training
loop), CLIP-S through models.clip_score, the reward terms by name and the --reward choices that add them up,
and the baselines subtracted from them; and unpaired training's CLIP rewards (CgT-GAN's score against the
image, or against its CLIP-agg of a sentence corpus) and its --reward choices."""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from data.errors import InputError
from data.features import FeatureFile
from data.references import ImageId, references_from_features
from data.store import read_features
from models.clip_score import ClipScorer, holds_image_embeds_of
from models.text_memory import TextMemory
from stages.ptb_tokenizer import ptb_tokens

BASELINES = ("mean", "greedy")
# Tokens the COCO toolkit's PTB tokenizer step removes (pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS;
# spelled out here so that training does not import the toolkit).
PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)


def normalize_caption(text: str) -> str:
    """A caption as pycocoevalcap's PTB tokenizer step leaves it: its white space collapsed (as
    stages.evaluate.ptb_tokenize does), tokenized and lowercased as PTBTokenizer does (see
    stages.ptb_tokenizer for where it may still differ), punctuation tokens removed."""
    return " ".join(token for token in ptb_tokens(" ".join(text.split())) if token not in PTB_PUNCTUATION)


class CiderD:
    """CIDEr-D (Vedantam et al. 2015, coco-caption's Cider): tf-idf n-gram vectors for n = 1..4, counts
    clipped by the reference's, a Gaussian length penalty (sigma 6), the mean over n and references,
    times 10. Document frequencies come from the references given, once, and every reference's vector is
    precomputed: flat arrays of 64-bit n-gram hashes, compact for a large training set. A batch of
    captions is scored with array operations that touch only the n-grams a caption shares with its
    image's references."""

    def __init__(self, references: dict[ImageId, list[str]], max_n: int = 4, sigma: float = 6.0):
        """`references`: each image's reference captions, already normalized (see normalize_caption)."""
        if not references or not all(references.values()):
            raise InputError("CIDEr-D needs at least one reference caption for every image")
        self.max_n, self.sigma = max_n, sigma
        self.image_index = {image_id: index for index, image_id in enumerate(references)}
        refs_per_image = np.array([len(captions) for captions in references.values()])
        self.image_first_ref = np.concatenate(([0], np.cumsum(refs_per_image)))  # (images + 1,)
        image_of_ref = np.repeat(np.arange(len(references)), refs_per_image)
        refs = _Ngrams([caption for captions in references.values() for caption in captions], max_n)
        # Document frequency: in how many images' references an n-gram occurs.
        _, first = np.unique(_pair_key(image_of_ref[refs.owner], refs.hashes), return_index=True)
        self.df_hashes, df = np.unique(refs.hashes[first], return_counts=True)
        self.df_log = np.log(np.maximum(1.0, df.astype(np.float64)))
        self.ref_len = math.log(len(references))  # log of the number of images, as coco-caption
        weights = refs.term_freq * (self.ref_len - self.log_df(refs.hashes))
        self.ref_norms = _norms(refs.owner, refs.order, weights, len(refs.lengths), max_n)  # (refs, max_n)
        self.ref_lengths = refs.lengths
        # Reference entries sorted by (image, n-gram), to find a caption's n-grams among its image's refs.
        keys = _pair_key(image_of_ref[refs.owner], refs.hashes)
        order = keys.argsort(kind="stable")
        self.entry_keys, self.entry_weights = keys[order], weights[order]
        self.entry_local_ref = (refs.owner - self.image_first_ref[image_of_ref[refs.owner]])[order]
        self.entry_order = refs.order[order]

    def log_df(self, hashes: np.ndarray) -> np.ndarray:
        """log(max(1, document frequency)) of each n-gram hash (0 for n-grams no reference has)."""
        positions = np.minimum(_search(self.df_hashes, hashes), len(self.df_hashes) - 1)
        return np.where(self.df_hashes[positions] == hashes, self.df_log[positions], 0.0)

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
        grams = _Ngrams(list(captions), self.max_n)
        weights = grams.term_freq * (self.ref_len - self.log_df(grams.hashes))
        norms = _norms(grams.owner, grams.order, weights, len(captions), self.max_n)  # (N, max_n)
        # Each (caption, reference of its image) pair is a row; a caption's rows are consecutive.
        refs_per_caption = np.diff(self.image_first_ref)[images]
        first_row = np.concatenate(([0], np.cumsum(refs_per_caption)[:-1]))
        caption_of_row = np.repeat(np.arange(len(captions)), refs_per_caption)
        ref_of_row = _ranges(self.image_first_ref[images], refs_per_caption)
        # The reference entries holding each caption n-gram (equal keys: same image, same n-gram).
        keys = _pair_key(images[grams.owner], grams.hashes)
        lower = _search(self.entry_keys, keys, side="left")
        matches = _search(self.entry_keys, keys, side="right") - lower
        entry = _ranges(lower, matches)
        gram = np.repeat(np.arange(len(keys)), matches)
        reference_weight = self.entry_weights[entry]
        clipped = np.minimum(weights[gram], reference_weight) * reference_weight
        rows = first_row[grams.owner[gram]] + self.entry_local_ref[entry]
        similarity = np.bincount(rows * self.max_n + self.entry_order[entry], clipped, len(ref_of_row) * self.max_n)
        similarity = similarity.astype(np.float64).reshape(-1, self.max_n)  # (rows, max_n); bincount of nothing is int
        denominator = norms[caption_of_row] * self.ref_norms[ref_of_row]
        similarity = np.divide(similarity, denominator, out=similarity, where=denominator != 0)
        delta = grams.lengths[caption_of_row] - self.ref_lengths[ref_of_row]
        similarity *= np.exp(-(delta**2) / (2 * self.sigma**2))[:, None]
        per_caption = np.zeros((len(captions), self.max_n))
        np.add.at(per_caption, caption_of_row, similarity)
        return list(per_caption.mean(axis=1) / refs_per_caption * 10.0)


class _Ngrams:
    """The n-grams (n = 1..max_n) of several captions: one entry per distinct n-gram of a caption, with
    its caption (owner), 64-bit hash, n - 1 (order) and count (term_freq); and each caption's length as
    coco-caption measures it (its number of bigrams)."""

    def __init__(self, captions: list[str], max_n: int):
        words = [caption.split() for caption in captions]
        sizes = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        word_hashes = np.fromiter((hash(w) for ws in words for w in ws), dtype=np.int64, count=int(sizes.sum()))
        word_hashes = word_hashes.view(np.uint64)
        owner_of_word = np.repeat(np.arange(len(words)), sizes)
        position = np.arange(len(word_hashes)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        owners, hashes, orders = [], [], []
        for n in range(1, max_n + 1):
            starts = np.flatnonzero(position + n <= sizes[owner_of_word])  # n-grams that fit in their caption
            combined = np.full(len(starts), np.uint64(n))  # the order is part of the hash
            for k in range(n):
                combined = combined * _MIX + word_hashes[starts + k]  # wrapping uint64 arithmetic
            owners.append(owner_of_word[starts])
            hashes.append(combined.view(np.int64))
            orders.append(np.full(len(starts), n - 1))
        owner, hashed, order = np.concatenate(owners), np.concatenate(hashes), np.concatenate(orders)
        _, first, counts = np.unique(_pair_key(owner, hashed), return_index=True, return_counts=True)
        self.owner, self.hashes, self.order = owner[first], hashed[first], order[first]
        self.term_freq = counts.astype(np.float64)
        self.lengths = np.maximum(sizes - 1, 0).astype(np.float64)  # coco-caption's length: bigrams


_MIX = np.uint64(0x9E3779B97F4A7C15)  # an odd 64-bit constant (the golden ratio's): mixes hashes into one


def _pair_key(owners: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """One 64-bit key per (owner, n-gram hash); two pairs share one only by a 2**-64 chance, as two
    n-gram hashes can."""
    return (hashes.view(np.uint64) + (owners.astype(np.uint64) + np.uint64(1)) * _MIX).view(np.int64)


def _search(sorted_array: np.ndarray, queries: np.ndarray, side: str = "left") -> np.ndarray:
    """np.searchsorted with the queries sorted first: each search then starts where the last one ended,
    which keeps the large array's memory access in order (about twice as fast here)."""
    order = queries.argsort()
    positions = np.empty(len(queries), dtype=np.int64)
    positions[order] = np.searchsorted(sorted_array, queries[order], side=side)
    return positions


def _norms(owner: np.ndarray, order: np.ndarray, weights: np.ndarray, count: int, max_n: int) -> np.ndarray:
    """The L2 norm of each caption's tf-idf vector per n. (count, max_n)"""
    squares = np.bincount(owner * max_n + order, weights=weights**2, minlength=count * max_n)
    return np.sqrt(squares).reshape(count, max_n)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of range(start, start + length) for each pair, as one array."""
    offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return np.arange(int(lengths.sum())) + offsets


@dataclass(frozen=True)
class RewardInputs:
    """What the reward terms are built from: the --reward choice (as errors name it), --data's features (its
    references and images) and name, the clip flags, and the device CLIP runs on."""

    reward: str
    train_file: FeatureFile
    data_name: str
    clip_model: str | None = None
    clip_features: str | None = None
    clip_weight: float = 1.0
    device: torch.device | str = "cpu"
    corpus: FeatureFile | None = None  # --unpaired: the sentence corpus (text embeddings of the CLIP model)


class RewardTerm(Protocol):
    """One part of a reward, built once from the RewardInputs (REWARD_TERMS names each)."""

    def __call__(self, image_ids: Sequence[ImageId], captions: Sequence[str]) -> torch.Tensor:
        """One reward per caption for its image, float32 on the CPU. (N,)"""


class CiderReward:
    """CIDEr-D against the image's references in --data (document frequencies from all of them)."""

    def __init__(self, inputs: RewardInputs):
        references = references_from_features(inputs.train_file)
        self.cider = CiderD(
            {image_id: [normalize_caption(c) for c in captions] for image_id, captions in references.items()}
        )

    def __call__(self, image_ids: Sequence[ImageId], captions: Sequence[str]) -> torch.Tensor:
        """CIDEr-D of each caption, float32 on the CPU. (N,)"""
        scores = self.cider.scores(image_ids, [normalize_caption(caption) for caption in captions])
        return torch.tensor(scores, dtype=torch.float32)


class ClipReward:
    """CLIP-S of --clip_model, from the image's CLIP embedding (in --data, or in --clip_features)."""

    def __init__(self, inputs: RewardInputs):
        if not inputs.clip_model:
            raise InputError(
                f"--reward {inputs.reward} needs --clip_model (a CLIP name, id or directory with both towers)"
            )
        self.clip = ClipScorer(inputs.clip_model, inputs.device)
        self.image_embeds = clip_image_embeddings(
            self.clip.name, inputs.train_file, inputs.data_name, inputs.clip_features
        )

    def __call__(self, image_ids: Sequence[ImageId], captions: Sequence[str]) -> torch.Tensor:
        """CLIP-S of each caption, float32 on the CPU. (N,)"""
        embeds = torch.stack([self.image_embeds[image_id] for image_id in image_ids])
        return self.clip.clip_s(embeds, list(captions)).cpu()


def clip_image_embeddings(
    clip_name: str, train_file: FeatureFile, data_name: str, clip_features: str | None
) -> dict[ImageId, torch.Tensor]:
    """Each training image's CLIP image embedding: from --data when it holds this model's image_embeds,
    else from --clip_features, a parse_coco_clip.py file of this model over the same images."""
    if clip_features is None:
        source, source_name = train_file, data_name
        if not holds_image_embeds_of(train_file, clip_name):
            raise InputError(
                f"--data {data_name} does not hold image_embeds of {clip_name}; give --clip_features, "
                f"a parse_coco_clip.py --clip_model_type {clip_name} file over the same images"
            )
    else:
        source, source_name = read_features(clip_features), clip_features
        if not holds_image_embeds_of(source, clip_name):
            encoder = source.meta.get("encoder", {}) or {}
            raise InputError(
                f"--clip_features {clip_features} holds features of {encoder.get('name', 'an unrecorded encoder')}, "
                f"not the image_embeds of --clip_model {clip_name}"
            )
    rows = source.image_rows()
    missing = [image_id for image_id in train_file.image_rows() if image_id not in rows]
    if missing:
        raise InputError(f"{source_name} lacks {len(missing)} image(s) of --data, e.g. {missing[0]!r}")
    return {image_id: source.embeddings[rows[image_id]] for image_id in train_file.image_rows()}


CLIP_COSINE_WEIGHT = 0.5  # w in CgT-GAN's CLIP score: w cos(a, t) + (1 - w)(1 - mean |a - t|)
AGGREGATION_TEMPERATURE = 100.0  # tau of CLIP-agg: softmax(tau cos(v, s_j)), CgT-GAN's (and DeCap's) 100


def clip_agg_targets(
    image_embeds: torch.Tensor, corpus_embeds: torch.Tensor, temperature: float = AGGREGATION_TEMPERATURE
) -> torch.Tensor:
    """CgT-GAN's CLIP-agg target of each image: a = sum_j softmax_j(tau cos(v, s_j)) s_j over the corpus's
    normalized text embeddings s_j; the formula of DeCap's projection, so its code. (B, D), (M, D) -> (B, D)"""
    return TextMemory(corpus_embeds, temperature).project(image_embeds)


def clip_target_score(targets: torch.Tensor, text_embeds: torch.Tensor, weight: float = CLIP_COSINE_WEIGHT) -> torch.Tensor:
    """CgT-GAN's CLIP score of each caption's normalized text embedding t against its target a:
    w cos(a, t) + (1 - w)(1 - mean |a - t|). (N, D), (N, D) -> (N,)"""
    cosine = F.cosine_similarity(targets, text_embeds, dim=-1)
    return weight * cosine + (1 - weight) * (1 - (targets - text_embeds).abs().mean(dim=-1))


class ClipTargetReward:
    """CgT-GAN's CLIP score of a caption's --clip_model text embedding against its image's target: the image
    embedding v itself (in --data, or in --clip_features), or with `aggregate` its CLIP-agg over --corpus."""

    def __init__(self, inputs: RewardInputs, aggregate: bool):
        if not inputs.clip_model:
            raise InputError(
                f"--reward {inputs.reward} needs --clip_model (a CLIP name, id or directory with both towers)"
            )
        self.clip = ClipScorer(inputs.clip_model, inputs.device)
        embeds = clip_image_embeddings(self.clip.name, inputs.train_file, inputs.data_name, inputs.clip_features)
        image_ids = list(embeds)
        images = torch.stack([embeds[image_id] for image_id in image_ids]).float().to(self.clip.device)  # (N, D)
        if aggregate:
            targets = clip_agg_targets(images, corpus_embeddings(inputs.corpus, self.clip.name).to(self.clip.device))
        else:
            targets = F.normalize(images, dim=-1)
        self.targets = dict(zip(image_ids, targets, strict=True))

    def __call__(self, image_ids: Sequence[ImageId], captions: Sequence[str]) -> torch.Tensor:
        """The CLIP score of each caption against its image's target, float32 on the CPU. (N,)"""
        targets = torch.stack([self.targets[image_id] for image_id in image_ids])
        return clip_target_score(targets, self.clip.text_embeddings(list(captions))).cpu()


def corpus_embeddings(corpus: FeatureFile | None, clip_name: str) -> torch.Tensor:
    """The corpus's text embeddings (M, D), refused unless they are `clip_name`'s (the images' CLIP)."""
    if corpus is None:
        raise InputError("--reward clip_agg needs --corpus, a sentence corpus's features (parse_corpus.py)")
    # parse_corpus.py records the CLIP of the text tower (its encoder is the image side, maybe an aligned one).
    text_clip = corpus.meta.get("clip_model") or (corpus.meta.get("encoder") or {}).get("name")
    if text_clip != clip_name:
        raise InputError(
            f"--corpus holds text embeddings of {text_clip or 'an unrecorded encoder'}, not of --clip_model "
            f"{clip_name}: CLIP-agg needs the images' CLIP"
        )
    return torch.as_tensor(corpus.embeddings.numpy(), dtype=torch.float32)


REWARD_TERMS: dict[str, Callable[[RewardInputs], RewardTerm]] = {
    "cider": CiderReward,
    "clip": ClipReward,
    "clip_image": lambda inputs: ClipTargetReward(inputs, aggregate=False),
    "clip_agg": lambda inputs: ClipTargetReward(inputs, aggregate=True),
}
# Each --reward choice: the terms it adds up, with their weights (a number, or the RewardInputs field of a flag).
REWARDS: dict[str, dict[str, float | str]] = {
    "cider": {"cider": 1.0},
    "clip": {"clip": 1.0},
    "cider+clip": {"cider": 1.0, "clip": "clip_weight"},
}
# Each --unpaired --reward choice: its CLIP term (a REWARD_TERMS name, or None) and whether the discriminator's
# adversarial reward joins it (weighed against it by lambda_t: stages/unpaired.py).
UNPAIRED_REWARDS: dict[str, tuple[str | None, bool]] = {
    "clip": ("clip_image", False),
    "clip_agg": ("clip_agg", False),
    "adv": (None, True),
    "clip_agg+adv": ("clip_agg", True),
}


def mean_of_others(rewards: torch.Tensor) -> torch.Tensor:
    """Each sample's baseline: the mean reward of its image's other samples (Luo 2020). (B, K) -> (B, K)."""
    num_samples = rewards.shape[1]
    if num_samples < 2:
        raise InputError("--baseline mean needs --scst_samples of at least 2 (or use --baseline greedy)")
    return (rewards.sum(dim=1, keepdim=True) - rewards) / (num_samples - 1)


def policy_gradient_loss(
    token_log_probs: torch.Tensor,
    token_mask: torch.Tensor,
    advantages: torch.Tensor,
    num_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """-sum((r - b) * log p(token)) over the sampled tokens, divided by `num_tokens` (default: their number,
    EOS counted; under torchrun, what makes DDP's mean over ranks the loss of all ranks' tokens).

    token_log_probs, token_mask: (N, T); advantages: (N,), one per sampled caption, no gradient."""
    weighted = token_log_probs * token_mask * advantages.detach().unsqueeze(1)
    divisor = token_mask.sum() if num_tokens is None else num_tokens
    return -weighted.sum() / divisor.clamp(min=1)
