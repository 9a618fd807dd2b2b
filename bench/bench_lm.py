"""The captioner's LM families side by side at equal size (about 124M parameters, random weights: speed does
not depend on them), all with GPT-2's 50257-token vocabulary: GPT-2 (GPT2Config()), the Llama architecture
(12 blocks of width 768, SwiGLU 2048) and T5 (6 + 6 blocks of width 768).

- train: a full fine-tune step of the MLP-prefix captioner at --batch_size captions (COCO-like lengths),
  samples/s and peak memory;
- greedy and beam: captions/s decoding --decode_batch images, --max_length tokens each (the end token is
  one no LM produces, so every family decodes the same number of steps);
- LoRA against a full fine-tune of a 350M-class LM (GPT-2 medium's architecture): training samples/s, peak
  memory and the size of the checkpoint each writes (LoRA's holds the mapper and adapters only).

`--architectures llama-1b --lm_dtype bf16` (Llama 3.2-1B's architecture) is the GPU check's 1B-class section.

Each variant runs in a fresh process, so its peak memory (peak RSS on CPU, peak allocated on CUDA) is its own.

    python bench/bench_lm.py                        # CPU: several minutes
    python bench/bench_lm.py --device cuda --steps 20
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2Config, LlamaConfig, T5Config, get_linear_schedule_with_warmup

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as `python bench/bench_lm.py`

from bench.bench_train import make_batches  # noqa: E402
from bench.child import peak_mib, print_run_header, run_variant_process  # noqa: E402
from data.captions import CaptionCollator  # noqa: E402
from data.errors import exit_on_input_error  # noqa: E402
from models.captioner import ClipCaptionModel  # noqa: E402
from models.checkpoint import save_checkpoint  # noqa: E402
from models.config import LM_DTYPES, CaptionerConfig  # noqa: E402
from models.decoding import DecodingOptions, decode  # noqa: E402
from models.device import DEVICE_HELP, resolve_device  # noqa: E402
from models.lm import lm_from_config, lora_targets  # noqa: E402
from models.lora import add_adapters  # noqa: E402
from stages.train import apply_gradients, compute_loss  # noqa: E402

VOCABULARY = 50257  # GPT-2's, for every family: the LM head costs the same
EOS = VOCABULARY - 1
NEVER_PRODUCED = -1  # decoding's end token: every family decodes exactly --max_length steps
# About 124M parameters each (the embedding matrix shared with the head).
ARCHITECTURES = {
    "gpt2": lambda: GPT2Config(),
    "llama": lambda: LlamaConfig(
        vocab_size=VOCABULARY, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=EOS, eos_token_id=EOS,
    ),
    "gpt2-medium": lambda: GPT2Config(n_embd=1024, n_layer=24, n_head=16),  # 355M: LoRA against a full fine-tune
    "llama-1b": lambda: LlamaConfig(  # Llama 3.2-1B's architecture (1.24B), for the GPU check: bf16 and LoRA
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
        bos_token_id=EOS, eos_token_id=EOS,
    ),
    "t5": lambda: T5Config(
        vocab_size=VOCABULARY, d_model=768, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=12,
        pad_token_id=EOS, eos_token_id=EOS, decoder_start_token_id=EOS,
    ),
}  # fmt: skip
TASKS = ("train", "greedy", "beam")
FINE_TUNES = ("full", "lora")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Benchmark flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--architectures", default="gpt2,llama,t5", help=f"comma list of: {', '.join(ARCHITECTURES)}")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma list of: train, greedy, beam")
    parser.add_argument(
        "--fine_tunes", default=",".join(FINE_TUNES), help="comma list of: full, lora (at 350M; empty: skip)"
    )
    parser.add_argument("--lora_architecture", default="gpt2-medium", help="the LM that LoRA and a full fine-tune train")
    parser.add_argument("--lora_r", type=int, default=16, help="LoRA rank (alpha 2r, its attention projections)")
    parser.add_argument(
        "--lm_dtype", default="fp32", choices=LM_DTYPES, help="the LM's weights for decoding and LoRA (full: fp32)"
    )
    parser.add_argument("--batch_size", type=int, default=40, help="captions per training step (ClipCap's --bs)")
    parser.add_argument("--decode_batch", type=int, default=64, help="images decoded together")
    parser.add_argument("--beam_size", type=int, default=5, help="beams per image for the beam task")
    parser.add_argument("--max_length", type=int, default=20, help="tokens decoded per caption")
    parser.add_argument("--feature_dim", type=int, default=512, help="image feature width (CLIP ViT-B/32: 512)")
    parser.add_argument("--prefix_length", type=int, default=10, help="prefix length of the MLP mapper")
    parser.add_argument("--steps", type=int, default=None, help="timed steps or decoding rounds (default 2 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocator, kernels)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, features and caption lengths")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: one variant, in a child process
    return parser.parse_args(argv)


def build_model(
    architecture: str, args: argparse.Namespace, fine_tune: str = "full", decoding: bool = False
) -> ClipCaptionModel:
    """The MLP-prefix captioner over a randomly initialized LM of `architecture`, the whole LM training
    (`full`) or frozen with LoRA adapters on its attention projections (`lora`); for decoding, in --lm_dtype."""
    torch.manual_seed(args.seed)
    dtype = "fp32" if fine_tune == "full" and not decoding else args.lm_dtype  # a full fine-tune needs fp32 weights
    lm = lm_from_config(ARCHITECTURES[architecture]().to_dict(), f"bench architecture {architecture}", dtype)
    config = CaptionerConfig(feature_dim=args.feature_dim, prefix_length=args.prefix_length, lm_dtype=dtype)
    if fine_tune == "full":
        return ClipCaptionModel(config, lm)
    targets = lora_targets(lm.config.model_type, architecture)
    config.lora = {"r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": 0.05, "targets": targets}
    config.lm_in_checkpoint = False
    model = ClipCaptionModel(config, add_adapters(lm, config.lora, architecture))
    model.freeze_lm()
    return model


def checkpoint_mib(model: ClipCaptionModel) -> float:
    """The size of the checkpoint train.py writes each epoch (config and weights, no optimizer state)."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "model.pt"
        save_checkpoint(path, model)
        return path.stat().st_size / 2**20


def synchronized_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def time_training(model: ClipCaptionModel, args: argparse.Namespace, device: torch.device, steps: int) -> float:
    """Seconds per full fine-tune step."""
    batches, _ = make_batches(args, args.warmup + steps)
    collate = CaptionCollator(pad_token_id=EOS)
    prepared = [collate(list(zip(features, tokens))).to(device) for features, tokens in batches]
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-5)
    scheduler = get_linear_schedule_with_warmup(optimizer, 5000, 100_000)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    model.train()
    for index, batch in enumerate(prepared):
        if index == args.warmup:
            start = synchronized_time(device)
        apply_gradients(compute_loss(model, batch, device, "fp32"), trainable, optimizer, scheduler, scaler, 1.0)
    return (synchronized_time(device) - start) / steps


def time_decoding(model: ClipCaptionModel, args: argparse.Namespace, device: torch.device, task: str, rounds: int) -> float:
    """Seconds per batch of --decode_batch images."""
    options = DecodingOptions(method=task, beam_size=args.beam_size, max_length=args.max_length)
    generator = torch.Generator().manual_seed(args.seed)
    features = torch.randn(args.decode_batch, args.feature_dim, generator=generator).to(device)
    model.eval()
    with torch.no_grad():
        for index in range(args.warmup + rounds):
            if index == args.warmup:
                start = synchronized_time(device)
            decode(model, model.condition(features), NEVER_PRODUCED, options)
    return (synchronized_time(device) - start) / rounds


def run_variant(args: argparse.Namespace) -> dict:
    """Time one (architecture, task) or (architecture, fine-tune) in this process; returns its figures."""
    architecture, task = args.variant.split(":")
    device = resolve_device(args.device)
    steps = args.steps or (20 if device.type == "cuda" else 2)
    fine_tune = task if task in FINE_TUNES else "full"
    model = build_model(architecture, args, fine_tune, decoding=task in ("greedy", "beam")).to(device)
    figures = {"variant": args.variant, "lm_parameters": sum(parameter.numel() for parameter in model.gpt.parameters())}
    if task in ("train", *FINE_TUNES):
        figures["per_s"] = args.batch_size / time_training(model, args, device, steps)
    else:
        figures["per_s"] = args.decode_batch / time_decoding(model, args, device, task, steps)
    figures["peak_mib"] = peak_mib(device)
    if task in FINE_TUNES:
        figures["checkpoint_mib"] = checkpoint_mib(model)
    return figures


def main(args: argparse.Namespace) -> None:
    """Run every variant in its own process and print a table."""
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    device = resolve_device(args.device)
    print_run_header(args, device)
    units = {"train": "samples/s", "greedy": "captions/s", "beam": "captions/s"}
    print(f"{'task':<8}{'architecture':<14}{'LM params':>11}{'rate':>10}  {'unit':<12}{'peak MiB':>9}")
    for task in args.tasks.split(","):
        for architecture in args.architectures.split(","):
            figures, error = run_variant_process(__file__, f"{architecture}:{task}")
            if figures is None:
                print(f"{task:<8}{architecture:<14} failed: {error}", flush=True)
                continue
            print(
                f"{task:<8}{architecture:<14}{figures['lm_parameters'] / 1e6:>10.1f}M{figures['per_s']:>10.2f}  "
                f"{units[task]:<12}{figures['peak_mib']:>9.0f}",
                flush=True,
            )
    fine_tunes = [fine_tune for fine_tune in args.fine_tunes.split(",") if fine_tune]
    if fine_tunes:
        print(f"{'fine-tune':<10}{'architecture':<14}{'LM params':>11}{'samples/s':>11}{'peak MiB':>10}{'ckpt MiB':>10}")
    for fine_tune in fine_tunes:
        figures, error = run_variant_process(__file__, f"{args.lora_architecture}:{fine_tune}")
        if figures is None:
            print(f"{fine_tune:<10}{args.lora_architecture:<14} failed: {error}", flush=True)
            continue
        print(
            f"{fine_tune:<10}{args.lora_architecture:<14}{figures['lm_parameters'] / 1e6:>10.1f}M{figures['per_s']:>11.2f}"
            f"{figures['peak_mib']:>10.0f}{figures['checkpoint_mib']:>10.1f}",
            flush=True,
        )


if __name__ == "__main__":
    with exit_on_input_error():
        main(parse_args())
