"""Feature extraction speed: our extraction (each image once, batched, decoded in workers) against
ClipCap's procedure (decode and encode the image of every caption, one at a time), measured in the
same run with the same weights, on a generated COCO-like set (640x480 JPEGs, 5 captions each).

Models are CLIP ViT-B/32 and DINOv2-B/14 at their real sizes with random weights (speed does not depend
on the weights), built from configs, saved, and loaded by path through models.encoders.load_encoder.

    python bench/bench_extract.py --num_images 64 --clipcap_captions 40
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/bench_extract.py`

from data.annotations import read_annotations  # noqa: E402
from data.errors import exit_on_input_error  # noqa: E402
from data.images import load_rgb  # noqa: E402
from models.device import DEVICE_HELP, PRECISION_HELP, autocast, resolve_device, resolve_precision  # noqa: E402
from models.encoders import ImageEncoder, Preprocess, load_encoder  # noqa: E402
from stages.extract import extract_features  # noqa: E402

# The architectures of openai/clip-vit-base-patch32 and facebook/dinov2-base.
MODEL_CONFIGS = {
    "clip_vit_b32": lambda: CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            patch_size=32,
            image_size=224,
            projection_dim=512,
        )
    ),
    "dinov2_vitb14": lambda: Dinov2Model(
        Dinov2Config(
            hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=14, image_size=518, mlp_ratio=4
        )
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Sizes of the run; the defaults keep a 2-core CPU run to a few minutes."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=64, help="generated images (default: %(default)s)")
    parser.add_argument(
        "--captions_per_image", type=int, default=5, help="captions per image, as COCO (default: %(default)s)"
    )
    parser.add_argument(
        "--clipcap_captions",
        type=int,
        default=40,
        help="captions timed with ClipCap's one-per-caption procedure (it is slow; default: %(default)s)",
    )
    parser.add_argument(
        "--models", nargs="+", default=list(MODEL_CONFIGS), choices=list(MODEL_CONFIGS), help="models to time"
    )
    parser.add_argument("--batch_size", type=int, default=64, help="our extraction's batch size (default: %(default)s)")
    parser.add_argument(
        "--num_workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="our decoding processes (default: %(default)s)",
    )
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--precision", default="auto", help=f"fp32, bf16, fp16 or {PRECISION_HELP}")
    parser.add_argument(
        "--work_dir", default=None, help="where to put images and models (default: a temporary directory)"
    )
    return parser.parse_args(argv)


def make_coco_like(directory: Path, num_images: int, captions_per_image: int) -> Path:
    """640x480 JPEGs with smooth content and some noise (about COCO's file sizes), and a ClipCap caption list."""
    rng = np.random.default_rng(0)
    (directory / "train2014").mkdir(parents=True, exist_ok=True)
    rows, cols = np.mgrid[0:480, 0:640]
    for image_id in range(1, num_images + 1):
        phase = rng.uniform(0, 6.28, 3)
        smooth = [127 + 100 * np.sin(rows / (20 + 7 * c) + cols / (30 + 5 * c) + phase[c]) for c in range(3)]
        pixels = np.stack(smooth, axis=-1) + rng.normal(0, 12, (480, 640, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        image.save(directory / "train2014" / f"COCO_train2014_{image_id:012d}.jpg", quality=90)
    entries = [
        {"image_id": image_id, "caption": f"a generated picture number {image_id}, caption {k}", "id": k}
        for k in range(captions_per_image)  # COCO's caption files interleave images
        for image_id in range(1, num_images + 1)
    ]
    captions_file = directory / "train_caption.json"
    captions_file.write_text(json.dumps(entries))
    return captions_file


def time_ours(encoder, preprocess, records, images_dir: Path, output_file: Path, args, device, precision) -> float:
    """Seconds for the whole extraction, feature file written."""
    start = time.perf_counter()
    extract_features(
        records,
        images_dir,
        encoder,
        preprocess,
        output_file,
        captions_file="bench",
        split=None,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=device,
        precision=precision,
    )
    synchronize(device)
    return time.perf_counter() - start


def time_clipcap(
    encoder: ImageEncoder, preprocess: Preprocess, entries: list[dict], images_dir: Path, device, precision
) -> float:
    """Seconds for ClipCap's parse_coco.py loop: per caption, decode its image and encode it alone."""
    start = time.perf_counter()
    features = []
    with torch.no_grad():
        for entry in entries:
            image = load_rgb(images_dir / "train2014" / f"COCO_train2014_{int(entry['image_id']):012d}.jpg")
            pixels = preprocess(image).unsqueeze(0).to(device)
            with autocast(device, precision):
                features.append(encoder(pixels).cpu())
    synchronize(device)
    return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(args: argparse.Namespace) -> None:
    """Time both procedures for each model and print images/s."""
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(
        "config:",
        json.dumps(
            {**vars(args), "device": device_name, "precision": precision, "torch_threads": torch.get_num_threads()}
        ),
    )
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        work = Path(work)
        captions_file = make_coco_like(work / "coco", args.num_images, args.captions_per_image)
        records = read_annotations(captions_file, images_dir=work / "coco")
        entries = json.loads(captions_file.read_text())[: args.clipcap_captions]
        print(f"{'model':<15} {'procedure':<34} {'images':>6} {'passes':>6} {'seconds':>8} {'images/s':>9}")
        for name in args.models:
            torch.manual_seed(0)
            MODEL_CONFIGS[name]().save_pretrained(work / name)
            encoder, preprocess = load_encoder(str(work / name))
            encoder.to(device)
            time_clipcap(encoder, preprocess, entries[:2], work / "coco", device, precision)  # warm-up
            ours = time_ours(encoder, preprocess, records, work / "coco", work / f"{name}.pkl", args, device, precision)
            clipcap = time_clipcap(encoder, preprocess, entries, work / "coco", device, precision)
            # ClipCap encodes an image once per caption: its images/s is captions/s over captions per image.
            clipcap_images = len(entries) / args.captions_per_image
            ours_rate, clipcap_rate = len(records) / ours, clipcap_images / clipcap
            print(
                f"{name:<15} {'ours (batch ' + str(args.batch_size) + ', ' + str(args.num_workers) + ' workers)':<34} "
                f"{len(records):>6} {len(records):>6} {ours:>8.2f} {ours_rate:>9.2f}"
            )
            print(
                f"{name:<15} {'ClipCap (per caption, batch 1)':<34} {clipcap_images:>6.0f} {len(entries):>6} "
                f"{clipcap:>8.2f} {clipcap_rate:>9.2f}"
            )
            print(f"{name:<15} speedup {ours_rate / clipcap_rate:.1f}x")


if __name__ == "__main__":
    with exit_on_input_error():
        main(parse_args())
