"""The ClipCap paper's prefix interpretation: each of an image's prefix embeddings, mapped to the nearest token
of the LM's input embedding matrix by L2 distance, by cosine similarity and by dot product.

    python tools/interpret_prefix.py runs/coco_mlp/coco_prefix-009.pt --features data/coco_val.pkl
    python tools/interpret_prefix.py exports/coco_mlp --features val_store/ --num_images 20 --output prefix.json

Prints, per image (its id and first caption) and per prefix position, the three tokens, repr'd so that their
whitespace shows. Prefix mappers only (mlp, transformer) on a causal LM: xattn and encoder-decoder captioners
have no prefix of LM input embeddings.
"""

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python tools/interpret_prefix.py`

from data.atomic import check_outputs, write_json_atomic  # noqa: E402
from data.errors import InputError, exit_on_input_error  # noqa: E402
from data.features import FEATURES_KEY, FeatureFile  # noqa: E402
from data.store import read_features  # noqa: E402
from models import quiet_transformers  # noqa: E402
from models.captioner import ClipCaptionModel  # noqa: E402
from models.checkpoint import captioner_tokenizer  # noqa: E402
from models.hf_export import load_captioner  # noqa: E402
from models.lm import input_embedding_matrix, is_encoder_decoder  # noqa: E402
from stages.predict import check_features_fit  # noqa: E402

METRICS = ("l2", "cosine", "dot")
VOCAB_CHUNK = 8192  # vocabulary rows scored at once: (N*P, 8192) floats, not (N*P, V)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a train.py checkpoint or an export.py directory")
    parser.add_argument("--features", required=True, help="feature file or store directory whose images to interpret")
    parser.add_argument(
        "--num_images", type=int, default=5, help="interpret the first N images of --features (default: %(default)s)"
    )
    parser.add_argument("--batch_size", type=int, default=64, help="images mapped together (default: %(default)s)")
    parser.add_argument("--output", help="also write the tokens to this JSON file")
    return parser.parse_args(argv)


def first_images(feature_file: FeatureFile, count: int) -> dict[Any, tuple[int, str]]:
    """The first `count` images of a feature file in caption order: image id -> (its row, its first caption)."""
    images: dict[Any, tuple[int, str]] = {}
    captions = feature_file.captions
    for index in range(len(captions)):  # by index: a store's captions are read one at a time, not all
        if len(images) == count:
            break
        caption = captions[index]
        images.setdefault(caption["image_id"], (caption[FEATURES_KEY], caption["caption"]))
    return images


def check_has_prefix(model: ClipCaptionModel, source: str) -> None:
    """Only a prefix mapper on a causal LM gives LM input embeddings to interpret: one line otherwise."""
    if model.config.cross_attention:
        raise InputError(
            f"{source}: mapping type {model.config.mapping_type!r} conditions the LM through cross-attention; "
            "it has no prefix of LM input embeddings to interpret"
        )
    if is_encoder_decoder(model.gpt):
        raise InputError(
            f"{source}: its {model.gpt.config.model_type} LM is an encoder-decoder, whose decoder starts from its "
            "start token; the prefix is no input embeddings of the LM's sequence to interpret"
        )


@torch.no_grad()
def nearest_tokens(prefix: torch.Tensor, embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per metric, the token id (N,) of the vocabulary row nearest each prefix embedding: prefix (N, E),
    embeddings (V, E). Scored in chunks of the vocabulary; ties go to the lower id."""
    prefix = prefix.float()
    best = {
        metric: (prefix.new_full((len(prefix),), -torch.inf), prefix.new_zeros(len(prefix), dtype=torch.long))
        for metric in METRICS
    }
    for start in range(0, len(embeddings), VOCAB_CHUNK):
        rows = embeddings[start : start + VOCAB_CHUNK].float()  # (C, E)
        dot = prefix @ rows.T  # (N, C)
        norms = rows.norm(dim=1)  # (C,)
        scores = {
            "l2": 2 * dot - norms.square(),  # -|p - e|^2 + |p|^2: the same order as -distance
            "cosine": dot / norms.clamp_min(1e-12),  # cos(p, e) * |p|: the same order as the cosine
            "dot": dot,
        }
        for metric, score in scores.items():
            value, index = score.max(dim=1)  # (N,)
            previous, previous_index = best[metric]
            better = value > previous
            best[metric] = (torch.where(better, value, previous), torch.where(better, index + start, previous_index))
    return {metric: index for metric, (_, index) in best.items()}


def interpret(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per image: its id, first caption, and per prefix position the nearest token by each metric."""
    if args.num_images < 1 or args.batch_size < 1:
        raise InputError(f"--num_images {args.num_images}, --batch_size {args.batch_size}: each must be at least 1")
    check_outputs({"--output": args.output}, {"CHECKPOINT": args.checkpoint, "--features": args.features})
    model = load_captioner(args.checkpoint)
    check_has_prefix(model, args.checkpoint)
    feature_file = read_features(args.features)
    check_features_fit(feature_file, model, args.features)
    tokenizer = captioner_tokenizer(model)
    embeddings = input_embedding_matrix(model.gpt).detach()  # (V, E)
    images = list(first_images(feature_file, args.num_images).items())
    results = []
    for start in range(0, len(images), args.batch_size):
        batch = images[start : start + args.batch_size]
        features = feature_file.embeddings[[row for _, (row, _) in batch]]  # (B, D)
        with torch.no_grad():
            prefix = model.condition(features).prefix  # (B, P, E)
        tokens = nearest_tokens(prefix.flatten(0, 1), embeddings)  # metric -> (B*P,)
        length = prefix.shape[1]
        for number, (image_id, (_, caption)) in enumerate(batch):
            positions = []
            for position in range(length):
                chosen = {metric: int(tokens[metric][number * length + position]) for metric in METRICS}
                positions.append(
                    {"position": position}
                    | {
                        metric: {"token_id": token, "token": tokenizer.decode([token])}
                        for metric, token in chosen.items()
                    }
                )
            results.append({"image_id": image_id, "caption": caption, "positions": positions})
    return results


def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Interpret the prefixes, print them, write --output; returns the per-image results."""
    results = interpret(args)
    for image in results:
        print(f"image {image['image_id']!r}: {image['caption']!r}")
        for entry in image["positions"]:
            shown = "  ".join(f"{metric} {entry[metric]['token']!r:<14}" for metric in METRICS)
            print(f"  {entry['position']:>3}  {shown.rstrip()}")
    if args.output:
        write_json_atomic(
            args.output, {"checkpoint": str(args.checkpoint), "features": str(args.features), "images": results}
        )
        print(f"wrote {len(results)} image(s) to {args.output}", file=sys.stderr)
    return results


if __name__ == "__main__":
    quiet_transformers()
    with exit_on_input_error():
        main(parse_args())
