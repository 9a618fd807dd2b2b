"""Caption images (or a feature file) with a trained captioner, or with an original ClipCap state dict.

python predict.py photo.jpg more_photos/ "shots/*.png" --checkpoint out/coco-009.pt
python predict.py val2014/ --checkpoint out/coco-009.pt --output preds.json --sheet sheet.png
python predict.py --features coco_val.pkl --checkpoint out/coco-009.pt --output preds.json
python predict.py photo.jpg --weights coco_weights.pt --mapping_type mlp --prefix_length 10 --gpt2 gpt2
"""

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from data.annotations import image_id_from_path
from data.errors import InputError, exit_on_input_error
from data.features import read_feature_file
from data.predictions import expand_image_inputs, write_coco_results
from data.sheet import draw_contact_sheet, sheet_format
from models.checkpoint import load_checkpoint, load_clipcap_weights, load_tokenizer
from models.config import CaptionerConfig
from models.decoding import DecodingOptions, add_decoding_args, decoding_options_from_args
from models.mappers import MAPPERS
from models.prediction import (
    caption_feature_file,
    caption_image_files,
    check_feature_width,
    load_clipcap_for_images,
    load_for_images,
)
from models.runtime import resolve_device, resolve_precision

PROGRESS_FROM = 8  # images; fewer than this get no progress bar
CLIPCAP_STOP_TOKEN = "."  # ClipCap's captions carry no EOS: its models end them with a period


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", metavar="IMAGE_OR_DIR_OR_GLOB", help="image files, directories, globs")
    parser.add_argument("--checkpoint", help="a checkpoint written by train.py (its config names the encoder)")
    parser.add_argument("--features", help="caption this feature file (one caption per image row) instead of images")
    parser.add_argument("--output", help="write COCO results [{image_id, caption}] (the best caption) to this JSON")
    parser.add_argument("--sheet", help="draw the images with their captions into this picture (e.g. sheet.png)")
    parser.add_argument(
        "--sheet_max",
        type=int,
        default=64,
        help="draw at most this many images, the first ones (a sheet of all of COCO would not fit in memory)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto (a GPU when there is one)")
    parser.add_argument("--batch_size", type=int, default=64, help="images encoded and decoded together")
    parser.add_argument("--precision", default="auto", help="fp32, bf16 or fp16 (CUDA); auto: bf16 on CUDA, else fp32")
    parser.add_argument("--num_workers", type=int, default=2, help="processes decoding image files")
    clipcap = parser.add_argument_group("original ClipCap weights (instead of --checkpoint)")
    clipcap.add_argument("--weights", help="a bare ClipCap state dict, e.g. coco_weights.pt")
    clipcap.add_argument("--mapping_type", choices=sorted(MAPPERS), default="mlp", help="the weights' mapper")
    clipcap.add_argument("--prefix_length", type=int, default=10, help="the weights' prefix length")
    clipcap.add_argument("--prefix_length_clip", type=int, default=10, help="transformer mapper: feature tokens")
    clipcap.add_argument("--num_layers", type=int, default=8, help="transformer mapper: layers")
    clipcap.add_argument("--normalize_prefix", action="store_true", help="the weights expect L2-normalized features")
    clipcap.add_argument(
        "--clip_model_type", default="ViT-B/32", help="the weights' image encoder: CLIP or DINOv2 name, id or directory"
    )
    clipcap.add_argument("--gpt2", default="gpt2", help="the LM (and tokenizer) the weights were trained on")
    add_decoding_args(parser)
    return parser.parse_args(argv)


def _check_args(args: argparse.Namespace) -> None:
    if (args.checkpoint is None) == (args.weights is None):
        raise InputError("give exactly one of --checkpoint (this repo) and --weights (an original ClipCap state dict)")
    if bool(args.images) == bool(args.features):
        raise InputError("give images (files, directories, globs) or --features FILE, not both and not neither")
    if args.sheet and args.features:
        raise InputError("--sheet draws images; it cannot be used with --features")
    if args.sheet:
        sheet_format(args.sheet)  # a bad extension fails now, not after every image is captioned
    if args.batch_size < 1 or args.num_workers < 0 or args.sheet_max < 1:
        raise InputError("--batch_size and --sheet_max must be at least 1, --num_workers at least 0")


def _clipcap_settings(args: argparse.Namespace, feature_dim: int = 0) -> CaptionerConfig:
    """The settings an original ClipCap state dict cannot tell by itself."""
    return CaptionerConfig(
        feature_dim=feature_dim,
        prefix_length=args.prefix_length,
        prefix_length_clip=args.prefix_length_clip,
        mapping_type=args.mapping_type,
        num_layers=args.num_layers,
        normalize_prefix=args.normalize_prefix,
        lm_name=args.gpt2,
    )


def predict_features(
    args: argparse.Namespace, options: DecodingOptions, device: torch.device, precision: str
) -> list[tuple[object, list[str]]]:
    """Caption every image row of a feature file, printing `image_id<TAB>caption` lines."""
    feature_file = read_feature_file(args.features)
    if args.weights:
        model = load_clipcap_weights(args.weights, _clipcap_settings(args, feature_file.feature_dim))
    else:
        model = load_checkpoint(args.checkpoint)
    check_feature_width(feature_file.feature_dim, model, args.features)
    tokenizer = load_tokenizer(model.config.lm_name)
    results = caption_feature_file(
        model.to(device),
        tokenizer,
        feature_file,
        options,
        batch_size=args.batch_size,
        device=device,
        precision=precision,
        progress=feature_file.embeddings.shape[0] >= PROGRESS_FROM,
    )
    for image_id, captions in results:
        for caption in captions:
            print(f"{image_id}\t{caption}")
    return results


def predict_images(
    args: argparse.Namespace, options: DecodingOptions, device: torch.device, precision: str
) -> tuple[list[tuple[Path, list[str]]], int]:
    """Caption image files, printing `path<TAB>caption` lines and an error line for each unreadable
    one; returns (path, captions) of those read and the number that could not be."""
    paths = expand_image_inputs(args.images)
    if args.weights:
        model, encoder, preprocess = load_clipcap_for_images(
            args.weights, _clipcap_settings(args), args.clip_model_type
        )
    else:
        model, encoder, preprocess = load_for_images(args.checkpoint)
    tokenizer = load_tokenizer(model.config.lm_name)
    model.to(device)
    captioned, failed = [], 0
    results = caption_image_files(
        model,
        tokenizer,
        encoder,
        preprocess,
        paths,
        options,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=device,
        precision=precision,
        progress=len(paths) >= PROGRESS_FROM,
    )
    for result in results:
        path = paths[result.index]
        if result.captions is None:
            tqdm.write(f"error: {path}: {result.error}", file=sys.stderr)  # keeps the progress bar intact
            failed += 1
            continue
        captioned.append((path, result.captions))
        for text in result.captions:
            print(f"{path}\t{text}")
    return captioned, failed


def main(args: argparse.Namespace) -> None:
    _check_args(args)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    options = decoding_options_from_args(args)
    if args.weights and options.stop_token is None:
        options.stop_token = CLIPCAP_STOP_TOKEN
    source = f"--checkpoint {args.checkpoint}" if args.checkpoint else f"--weights {args.weights} ({args.mapping_type})"
    inputs = f"--features {args.features}" if args.features else f"{len(args.images)} input(s)"
    print(
        f"predict: {source}, {inputs}, device {device}, precision {precision}, batch {args.batch_size}", file=sys.stderr
    )
    print(f"decoding: {options}", file=sys.stderr)

    if args.features:
        results, failed = predict_features(args, options, device, precision), 0
    else:
        captioned, failed = predict_images(args, options, device, precision)
        results = [(image_id_from_path(path), captions) for path, captions in captioned]
        if args.sheet and captioned:
            drawn = captioned[: args.sheet_max]
            draw_contact_sheet([path for path, _ in drawn], [captions[0] for _, captions in drawn], args.sheet)
            print(f"contact sheet: {args.sheet} ({len(drawn)} of {len(captioned)} images)", file=sys.stderr)
    if args.output:
        write_coco_results(args.output, [(image_id, captions[0]) for image_id, captions in results])
        print(f"wrote {len(results)} captions to {args.output}", file=sys.stderr)
    if failed:
        raise InputError(f"{failed} of {failed + len(results)} images could not be read (see the lines above)")


if __name__ == "__main__":
    with exit_on_input_error():
        main(parse_args())
