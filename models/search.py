"""The search loops behind models.decoding: greedy and sampled decoding, and beam search, each
batched across images and stepping the LM one token at a time with its key/value cache."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache, PreTrainedModel

if TYPE_CHECKING:  # models.decoding imports this module
    from models.decoding import DecodingOptions


@dataclass
class Hypothesis:
    """One decoded caption: its tokens (the final EOS or stop token included), summed log-probability
    under the model, and the length-normalized score it is ranked by."""

    tokens: list[int]
    log_prob: float
    score: float  # log_prob / len(tokens)


@functools.cache
def _cache_keyword(lm_class: type) -> str:
    # transformers 5.24 renamed forward's `past_key_values` to `cache` (the old name is deprecated).
    # Looked up once per LM class: decoding builds rows for every batch.
    return "cache" if "cache" in inspect.signature(lm_class.forward).parameters else "past_key_values"


class LanguageModelRows:
    """The rows being decoded, as the LM sees them: a KV cache that grows by one token a step, or
    (use_cache=False) the whole embedded sequence, recomputed at every step as ClipCap does."""

    def __init__(self, lm: PreTrainedModel, prefix_embeds: torch.Tensor, use_cache: bool):
        self.lm = lm
        self.embed_tokens = lm.get_input_embeddings()
        self.cache = DynamicCache(config=lm.config) if use_cache else None
        self.cache_keyword = _cache_keyword(type(lm))
        self.sequence = prefix_embeds  # (R, P, E); grows by one embedding a step without the cache

    def start(self) -> torch.Tensor:
        """Logits of the first caption token, (R, V), from the prefix alone."""
        logits = self._run(self.sequence)
        if self.cache is not None:
            self.sequence = None  # the cache holds everything the next steps need
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row, (R,), and return the logits of the next one, (R, V)."""
        new_embeds = self.embed_tokens(tokens).unsqueeze(1)  # (R, 1, E)
        if self.cache is not None:
            return self._run(new_embeds)
        self.sequence = torch.cat((self.sequence, new_embeds.to(self.sequence.dtype)), dim=1)  # (R, L+1, E)
        return self._run(self.sequence)

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and reorder to) `rows`: beams that survive, or sequences not yet finished."""
        if self.cache is not None:
            self.cache.batch_select_indices(rows)
        else:
            self.sequence = self.sequence[rows]

    def repeat(self, times: int) -> None:
        """Each row becomes `times` consecutive rows (one per beam)."""
        if self.cache is not None:
            self.cache.batch_repeat_interleave(times)
        else:
            self.sequence = self.sequence.repeat_interleave(times, dim=0)

    def _run(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        # Rows never need padding (all have the same length), so no attention mask; only the
        # last position goes through the LM head.
        output = self.lm(
            inputs_embeds=inputs_embeds,
            use_cache=self.cache is not None,
            logits_to_keep=1,
            **{self.cache_keyword: self.cache},
        )
        return output.logits[:, -1].float()  # (R, V)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask all but the `top_k` likeliest tokens, then all outside the smallest set holding `top_p`."""
    if 0 < top_k < logits.shape[-1]:
        kth_best = logits.topk(top_k, dim=-1).values[:, -1:]  # (R, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already hold top_p; the likeliest always stays.
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _next_tokens(logits: torch.Tensor, options: DecodingOptions, generator: torch.Generator | None) -> torch.Tensor:
    """The argmax (greedy), or a draw from the tempered, filtered distribution (sample): (R,)."""
    if options.method == "greedy":
        return logits.argmax(dim=-1)
    filtered = filter_logits(logits / options.temperature, options.top_k, options.top_p)
    return torch.multinomial(filtered.softmax(dim=-1), 1, generator=generator).squeeze(1)


def greedy_or_sample(
    rows: LanguageModelRows,
    num_images: int,
    stop_ids: torch.Tensor,
    options: DecodingOptions,
    generator: torch.Generator | None,
) -> list[list[Hypothesis]]:
    """One sequence per row; rows are image-major (num_captions per image). Finished rows leave the batch."""
    device = stop_ids.device
    num_rows = num_images * options.num_captions
    table = torch.zeros(num_rows, options.max_length, dtype=torch.long, device=device)  # generated tokens
    lengths = torch.zeros(num_rows, dtype=torch.long, device=device)
    log_probs = torch.zeros(num_rows, dtype=torch.float64, device=device)
    active = torch.arange(num_rows, device=device)  # which original row each LM row is
    logits = rows.start()
    for step in range(options.max_length):
        tokens = _next_tokens(logits, options, generator)  # (A,)
        # The model's own log-probability (temperature 1, unfiltered), so captions rank by likelihood.
        token_log_probs = logits.log_softmax(dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)
        table[active, step] = tokens
        lengths[active] += 1
        log_probs[active] += token_log_probs.double()
        going_on = ~torch.isin(tokens, stop_ids)
        if step == options.max_length - 1 or not going_on.any():
            break
        if not going_on.all():
            kept = going_on.nonzero().squeeze(1)
            rows.select(kept)
            active, tokens = active[kept], tokens[kept]
        logits = rows.step(tokens)
    hypotheses = [_hypothesis(table[row], lengths[row], log_probs[row]) for row in range(num_rows)]
    per_image = [hypotheses[i : i + options.num_captions] for i in range(0, num_rows, options.num_captions)]
    return [sorted(group, key=lambda hypothesis: hypothesis.score, reverse=True) for group in per_image]


def _hypothesis(tokens: torch.Tensor, length: torch.Tensor, log_prob: torch.Tensor) -> Hypothesis:
    length = int(length)
    log_prob = float(log_prob)
    return Hypothesis(tokens=tokens[:length].tolist(), log_prob=log_prob, score=log_prob / length)


def beam_search(
    rows: LanguageModelRows, num_images: int, stop_ids: torch.Tensor, options: DecodingOptions
) -> list[list[Hypothesis]]:
    """ClipCap's beam search, batched over images (rows image-major, beam_size per image).

    As in ClipCap, beams compete by length-normalized score (log-probability / tokens generated, the
    stop token counted) at every step; a finished beam stays in the beam, unchanged, until all beams
    of its image have finished or max_length tokens are generated. An image leaves the batch then.
    """
    beam_size = options.beam_size
    log_probs = rows.start().log_softmax(dim=-1)  # (B, V)
    vocab_size = log_probs.shape[-1]
    scores, tokens = log_probs.topk(beam_size, dim=-1)  # (B, K): summed log-probabilities, first tokens
    tokens = tokens.unsqueeze(-1)  # (B, K, T)
    lengths = torch.ones_like(scores, dtype=torch.long)
    finished = torch.isin(tokens[..., -1], stop_ids)
    rows.repeat(beam_size)
    active = torch.arange(num_images, device=scores.device)  # which image each beam group is
    results: list[list[Hypothesis]] = [[] for _ in range(num_images)]
    beam_offsets = torch.arange(beam_size, device=scores.device)
    for _ in range(1, options.max_length):
        done = finished.all(dim=1)
        if done.any():
            for group in done.nonzero().squeeze(1).tolist():
                results[int(active[group])] = _best_beams(tokens[group], lengths[group], scores[group], options)
            kept = (~done).nonzero().squeeze(1)
            if kept.numel() == 0:
                return results
            rows.select((kept.unsqueeze(1) * beam_size + beam_offsets).flatten())
            active, tokens, lengths, scores, finished = (x[kept] for x in (active, tokens, lengths, scores, finished))
        num_groups = active.shape[0]
        # In place from here on: each (G, K, V) pass costs as much as a small matmul.
        candidates = rows.step(tokens[..., -1].flatten()).log_softmax(dim=-1).view(num_groups, beam_size, -1)
        if finished.any():
            # A finished beam has one candidate: itself, extended by a placeholder that adds nothing.
            candidates.masked_fill_(finished.unsqueeze(-1), float("-inf"))
            candidates[..., 0].masked_fill_(finished, 0.0)
        candidate_lengths = lengths + (~finished).long()  # (G, K)
        candidates.add_(scores.unsqueeze(-1)).div_(candidate_lengths.unsqueeze(-1))  # length-normalized scores
        best, chosen = candidates.view(num_groups, -1).topk(beam_size, dim=-1)  # (G, K) over K*V candidates
        source = chosen // vocab_size  # the beam each survivor extends
        new_tokens = chosen % vocab_size
        lengths = candidate_lengths.gather(1, source)
        scores = best * lengths  # back to summed log-probabilities, as ClipCap does
        finished = finished.gather(1, source) | torch.isin(new_tokens, stop_ids)
        history = tokens.gather(1, source.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        tokens = torch.cat((history, new_tokens.unsqueeze(-1)), dim=-1)  # (G, K, T+1)
        rows.select((torch.arange(num_groups, device=source.device).unsqueeze(1) * beam_size + source).flatten())
    for group, image in enumerate(active.tolist()):
        results[image] = _best_beams(tokens[group], lengths[group], scores[group], options)
    return results


def _best_beams(
    tokens: torch.Tensor, lengths: torch.Tensor, scores: torch.Tensor, options: DecodingOptions
) -> list[Hypothesis]:
    """The num_captions best beams of one image, by length-normalized score."""
    order = (scores / lengths).sort(descending=True, stable=True).indices[: options.num_captions]
    return [_hypothesis(tokens[beam], lengths[beam], scores[beam]) for beam in order.tolist()]
