"""Stage 0's training step (train_clip.py): a ResNet-50 with the projection head (2048 -> 1024 -> 512) under
the symmetric InfoNCE loss, with the text side frozen and cached (train_clip.py's default: one table
lookup a step) against the same step with the frozen text tower run on the batch's captions every step.

The text tower is ViT-B/32's (CLIPTextConfig's defaults: 12 layers, 512 wide, 77 positions) with random
weights and a CLIP tokenizer trained on synthetic captions: speed does not depend on the weights.

    python bench/bench_align.py                                   # CPU, batch 32
    python bench/bench_align.py --device cuda --batch_size 256    # bf16 autocast
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as `python bench/bench_align.py`

from data.errors import exit_on_input_error  # noqa: E402
from data.synthetic import COLORS, SHAPES  # noqa: E402
from models.aligned import RESNET50_WIDTH, AlignedConfig, AlignedImageEncoder  # noqa: E402
from models.contrastive import ContrastivePair  # noqa: E402
from models.device import DEVICE_HELP, PRECISION_HELP, autocast, resolve_device, resolve_precision  # noqa: E402
from models.tiny import train_clip_tokenizer  # noqa: E402
from stages.train import apply_gradients  # noqa: E402

TEXT_WIDTH = 512  # ViT-B/32's embedding width


class FrozenTextTower(torch.nn.Module):
    """The text tower run every step, without gradients (frozen, as train_clip.py's default)."""

    def __init__(self, model: CLIPTextModelWithProjection):
        super().__init__()
        self.model = model.eval().requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(input_ids=input_ids, attention_mask=attention_mask).text_embeds


def captions(count: int, seed: int = 0) -> list[str]:
    """COCO-length captions (10 to 16 words)."""
    rng = random.Random(seed)
    words = [*COLORS, *SHAPES, "a", "on", "the", "with", "next", "to", "large", "small", "table", "dog", "man"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(10, 16))) for _ in range(count)]


def measure(variant: str, args: argparse.Namespace) -> dict:
    """Mean seconds and images/s of `--steps` training steps (after one warmup step) of one variant."""
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    torch.manual_seed(0)
    config = AlignedConfig("resnet50", RESNET50_WIDTH, 1024, TEXT_WIDTH, 224, 224, [0.5] * 3, [0.5] * 3)
    pair = ContrastivePair(AlignedImageEncoder(config)).to(device)
    trainable = [parameter for parameter in pair.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    pixels = torch.randn(args.batch_size, 3, 224, 224, device=device)
    texts = captions(args.batch_size)
    table = torch.randn(args.batch_size, TEXT_WIDTH, device=device)  # what the cache hands a step
    tokenizer = train_clip_tokenizer(captions(2000, seed=1))
    tower = None
    if variant == "text tower every step":
        config = CLIPTextConfig(
            vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
        )
        tower = FrozenTextTower(CLIPTextModelWithProjection(config)).to(device)
    times = []
    for step in range(args.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with autocast(device, precision):
            if tower is None:
                embeds = table
            else:
                batch = tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
                embeds = tower(batch["input_ids"], batch["attention_mask"])
            loss = pair(pixels, text_embeds=embeds).loss
        apply_gradients(loss, trainable, optimizer, scheduler, scaler, 1.0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step > 0:  # the first step warms up kernels and allocators
            times.append(time.perf_counter() - start)
    seconds = sum(times) / len(times)
    return {"variant": variant, "batch": args.batch_size, "precision": precision, "s_per_step": seconds,
            "images_per_s": args.batch_size / seconds}  # fmt: skip


def main() -> None:
    """Both variants, then the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=32, help="images (and captions) per step")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per variant (after one warmup)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--precision", default="auto", help=f"fp32, bf16, fp16 or {PRECISION_HELP}")
    args = parser.parse_args()
    rows = [measure(variant, args) for variant in ("cached text embeddings", "text tower every step")]
    print("| text side | batch | precision | s/step | images/s | speedup |\n|---|---|---|---|---|---|")
    for row in rows:
        speedup = f"{rows[1]['s_per_step'] / row['s_per_step']:.2f}x" if row is rows[0] else ""
        print(
            f"| {row['variant']} | {row['batch']} | {row['precision']} | {row['s_per_step']:.3f} | "
            f"{row['images_per_s']:.1f} | {speedup} |"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    with exit_on_input_error():
        main()
