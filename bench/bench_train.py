"""Training speed and memory: our training step (per-batch padding, no gradients for a frozen LM,
mixed precision on CUDA) against ClipCap's (bench/clipcap_reference.py: fixed-length padding,
fp32, LM gradients computed), in one run, on a real-size GPT-2 (GPT2Config(), random weights:
speed does not depend on them) with 512-d features at batch 40.

Caption lengths are drawn like GPT-2 token counts of COCO captions (about 12 +- 2.6 tokens, a few
long ones); ClipCap pads them all to its max_seq_len (mean + 10 std, at most the longest).
Each variant runs in a fresh process, so its peak memory is its own (peak RSS on CPU, peak
allocated on CUDA).

    python bench/bench_train.py                              # CPU: a few minutes
    python bench/bench_train.py --device cuda --steps 20      # fp32 and bf16
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, get_linear_schedule_with_warmup

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as `python bench/bench_train.py`

from bench.child import print_run_header, run_variant_process  # noqa: E402
from bench.clipcap_reference import ClipCaptionModel as ClipCapModel  # noqa: E402
from bench.clipcap_reference import ClipCaptionPrefix, clipcap_train_step, max_seq_len, pad_tokens  # noqa: E402
from data.captions import CaptionCollator  # noqa: E402
from data.errors import exit_on_input_error  # noqa: E402
from models.captioner import ClipCaptionModel  # noqa: E402
from models.config import CaptionerConfig  # noqa: E402
from models.device import DEVICE_HELP, resolve_device, resolve_precision  # noqa: E402
from stages.train import apply_gradients, compute_loss  # noqa: E402

MODES = ("only_prefix", "full")
IMPLEMENTATIONS = ("clipcap", "ours")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Benchmark flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--batch_size", type=int, default=40, help="captions per step (ClipCap's --bs)")
    parser.add_argument("--feature_dim", type=int, default=512, help="image feature width (CLIP ViT-B/32: 512)")
    parser.add_argument("--prefix_length", type=int, default=10, help="prefix length of the MLP mapper")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per variant (default 2 on CPU, 20 on CUDA)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocator, kernels)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of: only_prefix, full")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, features and caption lengths")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: one variant, in a child process
    return parser.parse_args(argv)


def caption_lengths(count: int, generator: torch.Generator) -> torch.Tensor:
    """Token counts like GPT-2's on COCO captions: mostly 9-16, one in 200 up to 40 (EOS included)."""
    lengths = (torch.randn(count, generator=generator) * 2.6 + 12).round().clamp(6, 30)
    long_ones = torch.rand(count, generator=generator) < 0.005
    lengths[long_ones] = torch.randint(25, 41, (int(long_ones.sum()),), generator=generator).float()
    return lengths.long()


def make_batches(args: argparse.Namespace, steps: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """Batches of (features (B, D), token ids list) and ClipCap's fixed length over a 20k-caption set."""
    generator = torch.Generator().manual_seed(args.seed)
    lengths = caption_lengths(20_000, generator)
    fixed_length = max_seq_len(lengths)
    batches = []
    for _ in range(steps):
        chosen = lengths[torch.randint(0, lengths.numel(), (args.batch_size,), generator=generator)]
        features = torch.randn(args.batch_size, args.feature_dim, generator=generator)
        tokens = [
            torch.randint(1, 50257, (int(length),), generator=generator) for length in chosen
        ]  # no 0: ClipCap ignores it
        batches.append((features, tokens))
    return batches, fixed_length


def run_variant(args: argparse.Namespace) -> dict:
    """Time one (implementation, mode, precision) in this process; returns its figures."""
    implementation, mode, precision = args.variant.split(":")
    device = resolve_device(args.device)
    steps = args.steps or (20 if device.type == "cuda" else 2)
    batches, fixed_length = make_batches(args, args.warmup + steps)
    torch.manual_seed(args.seed)
    lm = GPT2LMHeadModel(GPT2Config())
    if implementation == "ours":
        config = CaptionerConfig(
            feature_dim=args.feature_dim, prefix_length=args.prefix_length, lm_in_checkpoint=mode == "full"
        )
        model = ClipCaptionModel(config, lm)
        if mode == "only_prefix":
            model.freeze_lm()
        collate = CaptionCollator(pad_token_id=50256)
        prepared = [collate(list(zip(features, tokens))).to(device) for features, tokens in batches]
    else:
        model_class = ClipCaptionPrefix if mode == "only_prefix" else ClipCapModel
        model = model_class(args.prefix_length, lm, prefix_size=args.feature_dim)
        prepared = []
        for features, tokens in batches:
            padded = [pad_tokens(caption, fixed_length, args.prefix_length) for caption in tokens]
            prepared.append(
                tuple(
                    tensor.to(device)
                    for tensor in (torch.stack([t for t, _ in padded]), torch.stack([m for _, m in padded]), features)
                )
            )
    model.to(device).train()
    trainable = [
        parameter for parameter in model.parameters() if parameter.requires_grad
    ]  # ClipCaptionPrefix: the mapper
    optimizer = torch.optim.AdamW(trainable, lr=2e-5)
    scheduler = get_linear_schedule_with_warmup(optimizer, 5000, 100_000)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step(batch) -> None:
        if implementation == "ours":
            apply_gradients(compute_loss(model, batch, device, precision), trainable, optimizer, scheduler, scaler, 1.0)
        else:
            clipcap_train_step(model, optimizer, scheduler, *batch)

    for batch in prepared[: args.warmup]:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for batch in prepared[args.warmup :]:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    tokens = [batch.tokens.shape[1] if implementation == "ours" else fixed_length for batch in prepared[args.warmup :]]
    return {
        "variant": args.variant,
        "samples_per_s": args.batch_size * steps / seconds,
        "seconds_per_step": seconds / steps,
        "peak_mib": peak_mib,
        "padded_length": sum(tokens) / len(tokens),
        "device": str(device),
    }


def main(args: argparse.Namespace) -> None:
    """Run every variant in its own process and print a table."""
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    device = resolve_device(args.device)
    precisions = ["fp32", resolve_precision(None, device)] if device.type == "cuda" else ["fp32"]
    print_run_header(args, device)
    header = f"{'mode':<12}{'implementation':<16}{'precision':<10}{'pad len':>8}{'samples/s':>11}{'s/step':>9}{'peak MiB':>10}{'speedup':>9}"
    print(header)
    for mode in args.modes.split(","):
        baseline = None
        for implementation in IMPLEMENTATIONS:
            for precision in precisions if implementation == "ours" else ["fp32"]:
                figures, error = run_variant_process(__file__, f"{implementation}:{mode}:{precision}")
                if figures is None:
                    print(f"{mode:<12}{implementation:<16}{precision:<10} failed: {error}")
                    continue
                baseline = baseline or figures["samples_per_s"]
                print(
                    f"{mode:<12}{implementation:<16}{precision:<10}{figures['padded_length']:>8.1f}"
                    f"{figures['samples_per_s']:>11.2f}{figures['seconds_per_step']:>9.2f}{figures['peak_mib']:>10.0f}"
                    f"{figures['samples_per_s'] / baseline:>8.2f}x",
                    flush=True,
                )


if __name__ == "__main__":
    with exit_on_input_error():
        main(parse_args())
