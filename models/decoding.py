"""Captioning by decoding: greedy, beam search and sampling, batched across images and stepping the
LM one token at a time with its key/value cache. The one decoding module of predict.py, evaluate.py
and training-time evaluation."""

import argparse
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from data.errors import InputError
from data.options import add_options, check_ranges, option, option_fields
from models.captioner import ClipCaptionModel, Conditioning
from models.device import autocast
from models.lm import context_length, embed_tokens, lm_logits, new_cache, select_cache_rows
from models.text_memory import TextMemory

METHODS = ("greedy", "beam", "sample")


@dataclass
class DecodingOptions:
    """How captions are decoded, each field a flag of predict.py and evaluate.py (data/options.py); checked
    on creation, errors name the command-line flag."""

    method: str = option("beam", "decoding method", flag="decode", choices=METHODS, group="decoding")
    beam_size: int = option(5, "beams per image for --decode beam", minimum=1, group="decoding")
    num_captions: int = option(1, "captions per image, best first (beam, sample)", minimum=1, group="decoding")
    max_length: int = option(
        67, "most tokens per caption, the final one included (ClipCap's entry_length)", minimum=1, group="decoding"
    )
    temperature: float = option(1.0, "sampling temperature (--decode sample)", positive=True, group="decoding")
    top_p: float = option(
        1.0, "nucleus sampling: keep the likeliest tokens holding this mass, in (0, 1]", group="decoding"
    )
    top_k: int = option(0, "sample among the k likeliest tokens (0: all)", minimum=0, group="decoding")
    seed: int | None = option(None, "random seed for --decode sample (reproducible)", group="decoding")
    stop_token: str | None = option(
        None,
        'a one-token text that also ends a caption, kept in it (predict.py --weights: "." unless given; "": EOS only)',
        group="decoding",
    )
    use_cache: bool = True  # False recomputes the whole sequence at every step (the tests' oracle); not a flag

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"--decode {self.method}: choose from {', '.join(METHODS)}")
        check_ranges(self)
        if self.method == "greedy" and self.num_captions != 1:
            raise InputError("--num_captions: greedy decoding gives one caption per image; use beam or sample")
        if self.method == "beam" and self.num_captions > self.beam_size:
            raise InputError(f"--num_captions {self.num_captions}: at most --beam_size ({self.beam_size})")
        if not 0 < self.top_p <= 1:  # written so that NaN fails too
            raise InputError(f"--top_p {self.top_p}: must be in (0, 1]")


def add_decoding_args(parser: argparse.ArgumentParser) -> None:
    """The decoding flags shared by predict.py and evaluate.py, from DecodingOptions' fields."""
    add_options(parser, DecodingOptions, {"decoding": "decoding"})


def decoding_options_from_args(args: argparse.Namespace) -> DecodingOptions:
    """DecodingOptions from the flags of add_decoding_args."""
    return DecodingOptions(**{field.name: getattr(args, field.name) for field in option_fields(DecodingOptions)})


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, stop_token: str | None) -> tuple[int, ...]:
    """The id of --stop_token, which must be a single token of this tokenizer; () for none ("" included:
    it turns off the "." that --weights stops at by default)."""
    if not stop_token:
        return ()
    ids = tokenizer.encode(stop_token, add_special_tokens=False)
    if len(ids) != 1:
        raise InputError(f"--stop_token {stop_token!r} is {len(ids)} tokens for this tokenizer; it must be one")
    return (ids[0],)


@dataclass
class Hypothesis:
    """One decoded caption: its tokens (the final EOS or stop token included), summed log-probability
    under the model, and the length-normalized score it is ranked by."""

    tokens: list[int]
    log_prob: float
    score: float  # log_prob / len(tokens)


class LanguageModelRows:
    """The rows being decoded, as the LM sees them: a KV cache that grows by one token a step, or
    (use_cache=False) the whole embedded sequence, recomputed at every step as ClipCap does. With
    cross-attention, each row also keeps the states it attends to: the patch tokens (xattn), or an
    encoder-decoder's encoder output, computed once per image by model.condition."""

    def __init__(self, lm: PreTrainedModel, conditioning: Conditioning, use_cache: bool):
        self.lm = lm
        self.cross_states = conditioning.cross_states  # (R, T, E) or None
        self.cache = new_cache(lm) if use_cache else None
        self.sequence = conditioning.prefix  # (R, P, E); grows by one embedding a step without the cache

    def start(self) -> torch.Tensor:
        """Logits of the first caption token, (R, V), from the prefix alone."""
        logits = self._run(self.sequence)
        if self.cache is not None:
            self.sequence = None  # the cache holds everything the next steps need
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row, (R,), and return the logits of the next one, (R, V)."""
        new_embeds = embed_tokens(self.lm, tokens).unsqueeze(1)  # (R, 1, E)
        if self.cache is not None:
            return self._run(new_embeds)
        self.sequence = torch.cat((self.sequence, new_embeds.to(self.sequence.dtype)), dim=1)  # (R, L+1, E)
        return self._run(self.sequence)

    def select(self, rows: torch.Tensor, same_images: bool = False) -> None:
        """Keep (and reorder to) `rows`: beams that survive, or sequences not yet finished. With
        `same_images`, every row stays among its image's rows (beams reordered within their image), so
        the cross-attention states, the same for all of an image's rows, stay where they are."""
        if self.cross_states is not None and not same_images:
            # The LM runs its cross-attention only when given states; with the cache it reads the
            # cached keys and values, so these just keep the rows' count and order.
            self.cross_states = self.cross_states[rows]
        if self.cache is None:
            self.sequence = self.sequence[rows]
        else:
            select_cache_rows(self.cache, rows, cross_attention_unchanged=same_images)

    def repeat(self, times: int) -> None:
        """Each row becomes `times` consecutive rows (one per beam, or per sampled caption)."""
        if self.cross_states is not None:
            self.cross_states = self.cross_states.repeat_interleave(times, dim=0)
        if self.cache is not None:
            self.cache.batch_repeat_interleave(times)
        else:
            self.sequence = self.sequence.repeat_interleave(times, dim=0)

    def _run(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        # Rows never need padding (all have the same length), so no attention mask; only the
        # last position goes through the LM head.
        logits = lm_logits(self.lm, inputs_embeds, 1, cross_states=self.cross_states, cache=self.cache)
        return logits[:, -1].float()  # (R, V)


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
    """num_captions sequences per image, from rows with one per image; the first pass runs once per
    image, then rows are image-major (num_captions per image). Finished rows leave the batch."""
    device = stop_ids.device
    num_rows = num_images * options.num_captions
    table = torch.zeros(num_rows, options.max_length, dtype=torch.long, device=device)  # generated tokens
    lengths = torch.zeros(num_rows, dtype=torch.long, device=device)
    log_probs = torch.zeros(num_rows, dtype=torch.float64, device=device)
    active = torch.arange(num_rows, device=device)  # which original row each LM row is
    logits = rows.start()  # (B, V)
    if options.num_captions > 1:
        rows.repeat(options.num_captions)
        logits = logits.repeat_interleave(options.num_captions, dim=0)  # (B*n, V)
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
        rows.select(
            (torch.arange(num_groups, device=source.device).unsqueeze(1) * beam_size + source).flatten(),
            same_images=True,
        )
    for group, image in enumerate(active.tolist()):
        results[image] = _best_beams(tokens[group], lengths[group], scores[group], options)
    return results


def _best_beams(
    tokens: torch.Tensor, lengths: torch.Tensor, scores: torch.Tensor, options: DecodingOptions
) -> list[Hypothesis]:
    """The num_captions best beams of one image, by length-normalized score."""
    order = (scores / lengths).sort(descending=True, stable=True).indices[: options.num_captions]
    return [_hypothesis(tokens[beam], lengths[beam], scores[beam]) for beam in order.tolist()]


@torch.no_grad()
def decode(
    model: ClipCaptionModel,
    conditioning: Conditioning,
    eos_token_id: int,
    options: DecodingOptions,
    stop_token_ids: tuple[int, ...] | list[int] = (),
    generator: torch.Generator | None = None,
) -> list[list[Hypothesis]]:
    """Decode the images' conditioning (model.condition's output) into num_captions hypotheses per
    image, best first; a caption ends at EOS, at a stop token, or after max_length tokens. Sampling
    draws from `generator`, else from one seeded by options.seed (else torch's global generator)."""
    num_images, prefix_length = conditioning.prefix.shape[:2]
    max_positions = context_length(model.gpt)
    if max_positions is not None and prefix_length + options.max_length > max_positions:
        raise InputError(
            f"--max_length {options.max_length}: prefix ({prefix_length}) plus caption exceeds the LM's "
            f"{max_positions} positions"
        )
    device = conditioning.prefix.device
    stop_ids = torch.tensor([eos_token_id, *stop_token_ids], device=device)
    vocab_size = model.gpt.get_output_embeddings().weight.shape[0]  # the logits' width
    if options.method == "beam" and options.beam_size > vocab_size:
        raise InputError(f"--beam_size {options.beam_size}: more beams than the LM's {vocab_size} tokens")
    rows = LanguageModelRows(model.gpt, conditioning, options.use_cache)
    if options.method == "beam":
        return beam_search(rows, num_images, stop_ids, options)
    if generator is None:
        generator = sampling_generator(options, device)
    return greedy_or_sample(rows, num_images, stop_ids, options, generator)


def sampling_generator(options: DecodingOptions, device: torch.device) -> torch.Generator | None:
    """The generator a seeded sampling run draws from (None: torch's global one, or no sampling)."""
    if options.method != "sample" or options.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(options.seed)


def caption_text(tokenizer: PreTrainedTokenizerBase, tokens: list[int]) -> str:
    """A hypothesis's text: its tokens without the final EOS (a stop token stays, as in ClipCap), with
    runs of white space (byte-level tokens can be newlines or tabs) as single spaces."""
    if tokens and tokens[-1] == tokenizer.eos_token_id:
        tokens = tokens[:-1]
    return " ".join(tokenizer.decode(tokens).split())


def caption_features(
    model: ClipCaptionModel,
    tokenizer: PreTrainedTokenizerBase,
    features: torch.Tensor,
    options: DecodingOptions,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    progress: bool = False,
    generator: torch.Generator | None = None,
    memory: TextMemory | None = None,
) -> list[list[str]]:
    """Caption image features, (N, D) or patch tokens (N, T, D): num_captions captions per row, best
    first. The model must
    already be on `device` (default: where its weights are); it is put in eval mode meanwhile.
    Sampling draws from `generator` (a caller that captions in several calls passes one it keeps).
    With `memory`, each feature is first projected onto it (DeCap)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    stop_ids = stop_token_ids(tokenizer, options.stop_token)
    if generator is None:
        # One generator for the whole call, so batches do not repeat each other's draws.
        generator = sampling_generator(options, device)
    was_training = model.training
    model.eval()
    captions: list[list[str]] = []
    try:
        with tqdm(total=features.shape[0], unit="image", desc="captioning", disable=not progress) as bar:
            for start in range(0, features.shape[0], batch_size):
                batch = features[start : start + batch_size].to(device)  # (b, D) or (b, T, D)
                if memory is not None:
                    batch = memory.project(batch)  # (b, D)
                with torch.no_grad(), autocast(device, precision):
                    conditioning = model.condition(batch)
                    hypotheses = decode(model, conditioning, tokenizer.eos_token_id, options, stop_ids, generator)
                captions.extend([caption_text(tokenizer, h.tokens) for h in group] for group in hypotheses)
                bar.update(batch.shape[0])
    finally:
        model.train(was_training)
    return captions
