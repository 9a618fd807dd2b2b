"""The cross-attention captioner (--mapping_type xattn, patch tokens) against the MLP prefix
captioner (pooled features), on GPT-2 124M (random weights: speed does not depend on them):
captions/s with greedy and beam search, training samples/s, and peak memory, at one batch size.

Inputs have ViT-B/32's shapes: 50 patch tokens of width 768 for xattn, one 512-d vector for the
prefix model. Nothing stops early (no token is a stop token), so every caption is --max_length
tokens and both designs do the same number of steps. Each measurement runs in a process of its own,
so its peak memory is its own: on CUDA the peak allocated, on the CPU the peak resident set, whose
"model MiB" column is the resident set once the model is built.

    python bench/bench_xattn.py                        # CPU, several minutes
    python bench/bench_xattn.py --device cuda --steps 20
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/bench_xattn.py`

from bench.bench_train import caption_lengths  # noqa: E402
from bench.child import peak_mib, print_run_header, run_variant_process  # noqa: E402
from data.captions import CaptionCollator  # noqa: E402
from data.errors import exit_on_input_error  # noqa: E402
from models.captioner import ClipCaptionModel  # noqa: E402
from models.config import CaptionerConfig  # noqa: E402
from models.decoding import DecodingOptions, decode  # noqa: E402
from models.device import DEVICE_HELP, autocast, resolve_device, resolve_precision  # noqa: E402
from stages.train import apply_gradients, compute_loss  # noqa: E402

NO_TOKEN = -1  # an id no token has, used as EOS: nothing stops early
DESIGNS = {"mlp": {"feature_shape": (512,)}, "xattn": {"feature_shape": (50, 768)}}  # ViT-B/32's shapes
TASKS = ("greedy", "beam", "train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--precision", default=None, help="fp32, fp16 or bf16 (default: the device's best)")
    parser.add_argument("--batch_size", type=int, default=64, help="images per batch (default: %(default)s)")
    parser.add_argument("--beam_size", type=int, default=5, help="beams per image (default: %(default)s)")
    parser.add_argument("--max_length", type=int, default=20, help="tokens per caption (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=2, help="timed batches per measurement (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches first (default: %(default)s)")
    parser.add_argument(
        "--mode", choices=("only_prefix", "full"), default="only_prefix", help="what trains (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # DESIGN:TASK, run in a child process
    return parser.parse_args(argv)


def build_model(design: str, mode: str) -> ClipCaptionModel:
    """GPT-2 124M (random weights) with the design's mapper; frozen LM for --mode only_prefix."""
    cross_attention = design == "xattn"
    lm = GPT2LMHeadModel(GPT2Config(add_cross_attention=cross_attention))
    feature_dim = DESIGNS[design]["feature_shape"][-1]
    config = CaptionerConfig(
        feature_dim=feature_dim,
        prefix_length=1 if cross_attention else 10,
        mapping_type=design,
        lm_in_checkpoint=mode == "full",
    )
    model = ClipCaptionModel(config, lm)
    if mode == "only_prefix":
        model.freeze_lm()
    return model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(args: argparse.Namespace) -> dict:
    """Time one design and task in this process; returns its figures."""
    design, task = args.variant.split(":")
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    model = build_model(design, args.mode).to(device)
    model_mib = peak_mib(device)
    shape = (args.batch_size, *DESIGNS[design]["feature_shape"])
    batches = [torch.randn(shape, generator=generator) for _ in range(args.warmup + args.steps)]

    if task == "train":
        collate = CaptionCollator(pad_token_id=50256)
        lengths = caption_lengths(args.batch_size * len(batches), generator).view(len(batches), args.batch_size)
        prepared = [
            collate(
                [(row, torch.randint(0, 50257, (int(length),), generator=generator)) for row, length in zip(rows, sizes)]
            ).to(device)
            for rows, sizes in zip(batches, lengths)
        ]
        model.train()
        trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-5)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

        def step(batch) -> None:
            loss = compute_loss(model, batch, device, precision)
            apply_gradients(loss, trainable, optimizer, scheduler, scaler, 1.0)

    else:
        prepared = [features.to(device) for features in batches]
        options = DecodingOptions(method=task, beam_size=args.beam_size, max_length=args.max_length)
        model.eval()

        def step(features) -> None:
            with torch.no_grad(), autocast(device, precision):
                decode(model, model.condition(features), NO_TOKEN, options)

    for batch in prepared[: args.warmup]:
        step(batch)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for batch in prepared[args.warmup :]:
        step(batch)
    synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "variant": args.variant,
        "per_s": args.batch_size * args.steps / seconds,
        "seconds_per_batch": seconds / args.steps,
        "model_mib": model_mib,
        "peak_mib": peak_mib(device),
        "precision": precision,
        "trainable": sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad),
    }


def main(args: argparse.Namespace) -> None:
    """Run every design and task in its own process and print a table."""
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    device = resolve_device(args.device)
    print_run_header(args, device)
    print(
        f"{'task':<8}{'design':<8}{'precision':<10}{'per s':>10}{'s/batch':>9}{'model MiB':>11}{'peak MiB':>10}"
        f"{'trainable':>12}{'vs mlp':>8}"
    )
    for task in TASKS:
        baseline = None
        for design in DESIGNS:
            figures, error = run_variant_process(__file__, f"{design}:{task}")
            if figures is None:
                print(f"{task:<8}{design:<8} failed: {error}", flush=True)
                continue
            baseline = baseline or figures["per_s"]
            print(
                f"{task:<8}{design:<8}{figures['precision']:<10}{figures['per_s']:>10.2f}"
                f"{figures['seconds_per_batch']:>9.2f}{figures['model_mib']:>11.0f}{figures['peak_mib']:>10.0f}"
                f"{figures['trainable']:>12,}{figures['per_s'] / baseline:>7.2f}x",
                flush=True,
            )
    print("per s: captions/s for greedy and beam, training samples/s for train")


if __name__ == "__main__":
    with exit_on_input_error():
        main(parse_args())
