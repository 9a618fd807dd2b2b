"""Decoding speed: our batched, KV-cached greedy and beam search against ClipCap's one-image,
full-recompute decoders (bench/clipcap_decode.py), in one run, on the same real-size GPT-2
(random weights: speed does not depend on them) and the same prefixes.

Nothing stops early (no token is a stop token), so every caption is exactly --max_length tokens
and every method does the same number of steps. tokens/s counts the returned caption's tokens.

    python bench/bench_decode.py                      # CPU, a few minutes
    python bench/bench_decode.py --device cuda --images 512 --clipcap_images 16
"""

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/bench_decode.py`

from bench.clipcap_decode import generate2, generate_beam  # noqa: E402
from data.errors import exit_on_input_error  # noqa: E402
from models.captioner import ClipCaptionModel  # noqa: E402
from models.config import CaptionerConfig  # noqa: E402
from models.decoding import DecodingOptions, decode  # noqa: E402
from models.device import DEVICE_HELP, autocast, resolve_device, resolve_precision  # noqa: E402

NO_TOKEN = -1  # an id no token has: used as EOS and as ClipCap's stop token, so nothing stops early


class NoStopTokenizer:
    """What ClipCap's decoders need from a tokenizer: the stop token's id (none here) and a decode
    that shows the token ids, so their output can be compared with ours exactly."""

    def encode(self, text: str) -> list[int]:
        return [NO_TOKEN]

    def decode(self, tokens: list[int]) -> str:
        return " ".join(str(int(token)) for token in tokens)


@dataclass
class Timing:
    """One measured configuration."""

    name: str
    batch_size: int
    images: int
    seconds: float
    max_length: int

    def row(self, baseline: "Timing | None") -> str:
        per_image = self.seconds / self.images
        speedup = f"{baseline.seconds / baseline.images / per_image:8.1f}x" if baseline else "       -"
        return (
            f"{self.name:<28}{self.batch_size:>6}{self.images:>8}{self.seconds:>10.2f}"
            f"{self.images / self.seconds:>12.2f}{self.images * self.max_length / self.seconds:>11.1f}{speedup}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="images captioned at the large batch size")
    parser.add_argument("--batch_size", type=int, default=64, help="the large batch size")
    parser.add_argument("--single_images", type=int, default=4, help="images captioned at batch size 1 (ours)")
    parser.add_argument("--clipcap_images", type=int, default=2, help="images captioned by ClipCap's decoders")
    parser.add_argument("--beam_size", type=int, default=5, help="beams per image")
    parser.add_argument("--max_length", type=int, default=20, help="tokens per caption (a COCO caption is ~12)")
    parser.add_argument("--prefix_length", type=int, default=10, help="prefix embeddings (ClipCap's MLP: 10)")
    parser.add_argument("--feature_dim", type=int, default=512, help="image feature width (CLIP ViT-B/32: 512)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--precision", default="fp32", help="fp32, or bf16/fp16 on CUDA (ours only; ClipCap ran fp32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and features")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    return parser.parse_args(argv)


def random_captioner(args: argparse.Namespace, device: torch.device) -> ClipCaptionModel:
    """ClipCap's MLP captioner on a GPT-2 of the real size (124M parameters), random weights."""
    torch.manual_seed(args.seed)
    config = CaptionerConfig(feature_dim=args.feature_dim, prefix_length=args.prefix_length, lm_name="random-gpt2")
    return ClipCaptionModel(config, GPT2LMHeadModel(GPT2Config())).eval().to(device)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ours(
    model: ClipCaptionModel,
    prefix: torch.Tensor,
    options: DecodingOptions,
    batch_size: int,
    precision: str,
    name: str,
) -> tuple[Timing, list[list[int]]]:
    """Our decode over `prefix` (N, P, E) in batches; returns the timing and the best captions' tokens."""
    device = prefix.device
    best: list[list[int]] = []
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad(), autocast(device, precision):
        for first in range(0, prefix.shape[0], batch_size):
            hypotheses = decode(model, prefix[first : first + batch_size], NO_TOKEN, options)
            best.extend(group[0].tokens for group in hypotheses)
    synchronize(device)
    return Timing(name, batch_size, prefix.shape[0], time.perf_counter() - start, options.max_length), best


def time_clipcap(
    model: ClipCaptionModel, prefix: torch.Tensor, beam_size: int, max_length: int, name: str
) -> tuple[Timing, list[str]]:
    """ClipCap's decoder, one image at a time (beam search when beam_size, else generate2)."""
    tokenizer, texts = NoStopTokenizer(), []
    synchronize(prefix.device)
    start = time.perf_counter()
    for image in range(prefix.shape[0]):
        embed = prefix[image : image + 1]
        if beam_size:
            texts.append(generate_beam(model, tokenizer, beam_size, embed, max_length, stop_token="")[0])
        else:
            texts.append(generate2(model, tokenizer, embed, max_length, stop_token=""))
    synchronize(prefix.device)
    return Timing(name, 1, prefix.shape[0], time.perf_counter() - start, max_length), texts


def main(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    print(
        f"bench_decode: {vars(args)} -> device {device}, precision {precision}, torch threads {torch.get_num_threads()}"
    )
    model = random_captioner(args, device)
    features = torch.randn(args.images, args.feature_dim, generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        prefix = model.embed_prefix(features.to(device))  # (N, P, E)
    greedy = DecodingOptions(method="greedy", max_length=args.max_length)
    beam = DecodingOptions(method="beam", beam_size=args.beam_size, max_length=args.max_length)
    time_ours(model, prefix[:2], DecodingOptions(method="greedy", max_length=2), 2, precision, "warm-up")
    clipcap_prefix, single = prefix[: args.clipcap_images], prefix[: args.single_images]
    print(f"\n{'decoder':<28}{'batch':>6}{'images':>8}{'seconds':>10}{'captions/s':>12}{'tokens/s':>11}{'speedup':>9}")

    clipcap_greedy, clipcap_greedy_texts = time_clipcap(model, clipcap_prefix, 0, args.max_length, "ClipCap generate2")
    print(clipcap_greedy.row(None), flush=True)
    print(time_ours(model, single, greedy, 1, precision, "ours greedy")[0].row(clipcap_greedy), flush=True)
    big_greedy, greedy_tokens = time_ours(model, prefix, greedy, args.batch_size, precision, "ours greedy")
    print(big_greedy.row(clipcap_greedy), flush=True)

    beam_name = f"beam {args.beam_size}"
    clipcap_beam, clipcap_beam_texts = time_clipcap(
        model, clipcap_prefix, args.beam_size, args.max_length, f"ClipCap {beam_name}"
    )
    print(clipcap_beam.row(None), flush=True)
    print(time_ours(model, single, beam, 1, precision, f"ours {beam_name}")[0].row(clipcap_beam), flush=True)
    big_beam, beam_tokens = time_ours(model, prefix, beam, args.batch_size, precision, f"ours {beam_name}")
    print(big_beam.row(clipcap_beam), flush=True)

    tokenizer = NoStopTokenizer()
    same_greedy = clipcap_greedy_texts == [tokenizer.decode(tokens) for tokens in greedy_tokens[: args.clipcap_images]]
    same_beam = clipcap_beam_texts == [tokenizer.decode(tokens) for tokens in beam_tokens[: args.clipcap_images]]
    print(f"\nsame captions as ClipCap's decoders on the first {args.clipcap_images} images: ", end="")
    print(f"greedy {'yes' if same_greedy else 'NO'}, beam {'yes' if same_beam else 'NO'}")
    print(f"speedup = ClipCap's seconds per image / ours (same method); {args.max_length} tokens per caption")


if __name__ == "__main__":
    with exit_on_input_error():
        main(parse_args())
