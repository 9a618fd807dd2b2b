"""Captioning by decoding: greedy, beam search and sampling, batched across images and stepping the
LM with its key/value cache. The one decoding module of predict.py, evaluate.py and training-time
evaluation; the search loops themselves are in models.search."""

import argparse
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from data.errors import InputError
from models.captioner import ClipCaptionModel
from models.runtime import autocast
from models.search import Hypothesis, LanguageModelRows, beam_search, greedy_or_sample

__all__ = [
    "METHODS",
    "DecodingOptions",
    "Hypothesis",
    "add_decoding_args",
    "caption_features",
    "decode",
    "decoding_options_from_args",
    "stop_token_ids",
]

METHODS = ("greedy", "beam", "sample")


@dataclass
class DecodingOptions:
    """How captions are decoded; checked on creation, errors name the command-line flag."""

    method: str = "beam"  # greedy | beam | sample
    beam_size: int = 5
    num_captions: int = 1  # captions returned per image, best first
    max_length: int = 67  # most tokens generated per caption (ClipCap's entry_length), the final one included
    temperature: float = 1.0  # sampling only
    top_p: float = 1.0  # sampling only: nucleus mass kept
    top_k: int = 0  # sampling only: 0 keeps every token
    seed: int | None = None  # sampling only: a fixed seed makes the draws reproducible
    stop_token: str | None = None  # text of one token that also ends a caption (ClipCap: "."), kept in it
    use_cache: bool = True  # False recomputes the whole sequence at every step (the tests' oracle)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"--decode {self.method}: choose from {', '.join(METHODS)}")
        if self.beam_size < 1:
            raise InputError(f"--beam_size {self.beam_size}: must be at least 1")
        if self.num_captions < 1:
            raise InputError(f"--num_captions {self.num_captions}: must be at least 1")
        if self.method == "greedy" and self.num_captions != 1:
            raise InputError("--num_captions: greedy decoding gives one caption per image; use beam or sample")
        if self.method == "beam" and self.num_captions > self.beam_size:
            raise InputError(f"--num_captions {self.num_captions}: at most --beam_size ({self.beam_size})")
        if self.max_length < 1:
            raise InputError(f"--max_length {self.max_length}: must be at least 1")
        if self.temperature <= 0:
            raise InputError(f"--temperature {self.temperature}: must be positive (for the argmax use --decode greedy)")
        if not 0 < self.top_p <= 1:
            raise InputError(f"--top_p {self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise InputError(f"--top_k {self.top_k}: must be 0 (off) or positive")


def add_decoding_args(parser: argparse.ArgumentParser) -> None:
    """The decoding flags shared by predict.py and evaluate.py."""
    defaults = DecodingOptions()
    group = parser.add_argument_group("decoding")
    group.add_argument(
        "--decode", choices=METHODS, default=defaults.method, help="decoding method (default: %(default)s)"
    )
    group.add_argument("--beam_size", type=int, default=defaults.beam_size, help="beams per image for --decode beam")
    group.add_argument(
        "--num_captions", type=int, default=defaults.num_captions, help="captions per image, best first (beam, sample)"
    )
    group.add_argument(
        "--max_length", type=int, default=defaults.max_length, help="most tokens per caption (ClipCap: 67)"
    )
    group.add_argument(
        "--temperature", type=float, default=defaults.temperature, help="sampling temperature (--decode sample)"
    )
    group.add_argument(
        "--top_p",
        type=float,
        default=defaults.top_p,
        help="nucleus sampling: keep the likeliest tokens holding this mass",
    )
    group.add_argument("--top_k", type=int, default=defaults.top_k, help="sample among the k likeliest tokens (0: all)")
    group.add_argument("--seed", type=int, default=defaults.seed, help="random seed for --decode sample (reproducible)")
    group.add_argument(
        "--stop_token",
        default=defaults.stop_token,
        help='a one-token text that also ends a caption, kept in it (predict.py --weights: "." unless given; "": EOS only)',
    )


def decoding_options_from_args(args: argparse.Namespace) -> DecodingOptions:
    """DecodingOptions from the flags of add_decoding_args."""
    return DecodingOptions(
        method=args.decode,
        beam_size=args.beam_size,
        num_captions=args.num_captions,
        max_length=args.max_length,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop_token=args.stop_token,
    )


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, stop_token: str | None) -> tuple[int, ...]:
    """The id of --stop_token, which must be a single token of this tokenizer; () for none ("" included:
    it turns off the "." that --weights stops at by default)."""
    if not stop_token:
        return ()
    ids = tokenizer.encode(stop_token, add_special_tokens=False)
    if len(ids) != 1:
        raise InputError(f"--stop_token {stop_token!r} is {len(ids)} tokens for this tokenizer; it must be one")
    return (ids[0],)


def _max_positions(model: ClipCaptionModel) -> int | None:
    config = model.gpt.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


@torch.no_grad()
def decode(
    model: ClipCaptionModel,
    prefix_embeds: torch.Tensor,
    eos_token_id: int,
    options: DecodingOptions,
    stop_token_ids: tuple[int, ...] | list[int] = (),
    generator: torch.Generator | None = None,
) -> list[list[Hypothesis]]:
    """Decode prefixes (B, P, E) into num_captions hypotheses per image, best first; a caption ends
    at EOS, at a stop token, or after max_length tokens. Sampling draws from `generator`, else from
    one seeded by options.seed (else torch's global generator)."""
    num_images, prefix_length = prefix_embeds.shape[:2]
    max_positions = _max_positions(model)
    if max_positions is not None and prefix_length + options.max_length > max_positions:
        raise InputError(
            f"--max_length {options.max_length}: prefix ({prefix_length}) plus caption exceeds the LM's "
            f"{max_positions} positions"
        )
    device = prefix_embeds.device
    stop_ids = torch.tensor([eos_token_id, *stop_token_ids], device=device)
    if options.method == "beam":
        rows = LanguageModelRows(model.gpt, prefix_embeds, options.use_cache)
        return beam_search(rows, num_images, stop_ids, options)
    if generator is None:
        generator = sampling_generator(options, device)
    # num_captions independent rows per image, image-major
    prefix_embeds = prefix_embeds.repeat_interleave(options.num_captions, dim=0)  # (B*n, P, E)
    rows = LanguageModelRows(model.gpt, prefix_embeds, options.use_cache)
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
) -> list[list[str]]:
    """Caption image features (N, D): num_captions captions per row, best first. The model must
    already be on `device` (default: where its weights are); it is put in eval mode meanwhile.
    Sampling draws from `generator` (a caller that captions in several calls passes one it keeps)."""
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
                batch = features[start : start + batch_size].to(device)  # (b, D)
                with torch.no_grad(), autocast(device, precision):
                    prefix_embeds = model.embed_prefix(batch)  # (b, P, E)
                    hypotheses = decode(model, prefix_embeds, tokenizer.eos_token_id, options, stop_ids, generator)
                captions.extend([caption_text(tokenizer, h.tokens) for h in group] for group in hypotheses)
                bar.update(batch.shape[0])
    finally:
        model.train(was_training)
    return captions
