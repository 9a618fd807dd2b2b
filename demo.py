"""The demo: one command that generates a synthetic captioned image set, builds tiny models (random
weights, saved and loaded by path), aligns a tiny CNN to a tiny CLIP text tower (train_clip.py), then
extracts with the aligned encoder, trains, captions and evaluates with the real scripts, and compares the
model with the best constant caption; an SCST stage (train.py --scst) fine-tunes the model for test
CIDEr, before and after shown.

    python demo.py                       # about 4 minutes on 2 CPU cores, no download
    python demo.py --align_epochs 0      # extract with the random tiny ViT instead: it cannot see shape
    python demo.py --unpaired            # also text-only (CapDec, DeCap) and unpaired (CgT-GAN) routes
    python demo.py --pretrained          # ViT-B/32, gpt2 and a ResNet-50 from the hub instead
"""

import argparse
import dataclasses
import time

from data.errors import exit_on_input_error
from stages.demo import DemoOptions, DemoResult, format_comparison, run_demo
from stages.evaluate import DEFAULT_METRICS

TINY_LR, PRETRAINED_LR = 1e-3, 1e-4
SCST_LR = {False: 1e-4, True: 1e-5}  # by --pretrained: SCST fine-tunes at a tenth of the cross-entropy rate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """demo.py's flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_output", help="where everything goes (default: demo_output)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the outputs of an earlier demo in --output_dir"
    )
    parser.add_argument(
        "--pretrained", action="store_true", help="use ViT-B/32 and gpt2 by name (needs the hub) instead of tiny models"
    )
    parser.add_argument("--num_train", type=int, default=3000, help="training images (5 captions each)")
    parser.add_argument("--num_val", type=int, default=200, help="validation images, scored during training")
    parser.add_argument("--num_test", type=int, default=300, help="test images, captioned and evaluated at the end")
    parser.add_argument("--epochs", type=int, default=6, help="training epochs")
    parser.add_argument("--eval_every", type=int, default=2, help="score the validation set every N epochs")
    parser.add_argument("--bs", dest="batch_size", type=int, default=64, help="captions per training batch")
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate (default: 1e-3 for the tiny models, 1e-4 with --pretrained)",
    )
    parser.add_argument("--warmup_steps", type=int, default=50, help="learning-rate warmup steps")
    parser.add_argument("--prefix_length", type=int, default=4, help="LM embeddings the mapper makes of an image")
    parser.add_argument("--clip_patch_size", type=int, default=16, help="tiny CLIP: patch side in pixels")
    parser.add_argument("--clip_hidden_size", type=int, default=128, help="tiny CLIP: width (projection: half of it)")
    parser.add_argument("--lm_hidden_size", type=int, default=128, help="tiny GPT-2: width")
    parser.add_argument("--lm_layers", type=int, default=2, help="tiny GPT-2: layers")
    parser.add_argument(
        "--scst_epochs", type=int, default=1, help="SCST epochs after the cross-entropy training (0: no SCST stage)"
    )
    parser.add_argument(
        "--scst_bs", type=int, default=32, help="images per SCST (and --unpaired) batch (5 captions sampled each)"
    )
    parser.add_argument(
        "--scst_lr",
        type=float,
        default=None,
        help="SCST (and --unpaired) learning rate (default: 1e-4, 1e-5 with --pretrained)",
    )
    parser.add_argument(
        "--align_epochs",
        type=int,
        default=30,
        help="train_clip.py epochs aligning a tiny CNN to a tiny CLIP text tower before extraction (0: extract "
        "with the random tiny ViT instead)",
    )
    parser.add_argument("--align_image_size", type=int, default=96, help="alignment: the CNN's input side in pixels")
    parser.add_argument("--align_bs", type=int, default=64, help="alignment: images per batch")
    parser.add_argument("--align_lr", type=float, default=3e-3, help="alignment: peak learning rate")
    parser.add_argument(
        "--align_train_text",
        action="store_true",
        help="alignment: train the text tower too (default: frozen, its caption embeddings computed once)",
    )
    parser.add_argument("--decode", default="greedy", choices=("greedy", "beam"), help="decoding of the test captions")
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=list(DEFAULT_METRICS),
        choices=DEFAULT_METRICS,
        help="metric groups evaluate.py computes (CIDEr, which the bar compares, is always included)",
    )
    parser.add_argument(
        "--unpaired",
        action="store_true",
        help="also learn without pairs (docs/demo.md): text-only on the training captions (with and without DeCap's "
        "memory), then train.py --unpaired with the images of one half and the captions of the other; one line per route",
    )
    parser.add_argument("--unpaired_epochs", type=int, default=2, help="--unpaired: epochs of train.py --unpaired")
    parser.add_argument(
        "--gan_steps", type=int, default=10, help="--unpaired: steps of the adversarial reward alone (lambda 0)"
    )
    parser.add_argument(
        "--gan_warm_steps", type=int, default=30, help="--unpaired: steps over which lambda then rises to 0.5"
    )
    parser.add_argument("--disc_lr", type=float, default=1e-4, help="--unpaired: the discriminator's learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic set, the tiny models and training")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> DemoResult:
    """Run the demo and print the metrics table; returns the figures."""
    if args.lr is None:  # a pretrained GPT-2 is fine-tuned gently; a random one learns from scratch
        args.lr = PRETRAINED_LR if args.pretrained else TINY_LR
    if args.scst_lr is None:
        args.scst_lr = SCST_LR[args.pretrained]
    print("demo.py:", ", ".join(f"{name}={value}" for name, value in vars(args).items()))
    options = DemoOptions(**{field.name: getattr(args, field.name) for field in dataclasses.fields(DemoOptions)})
    start = time.perf_counter()
    result = run_demo(options)
    print("\n[result] test split, the model vs the most common training caption given to every test image")
    print(format_comparison(result))
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return result


if __name__ == "__main__":
    with exit_on_input_error():
        main(parse_args())
