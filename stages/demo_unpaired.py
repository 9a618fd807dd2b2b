"""demo.py --unpaired: learning without pairs beside the paired model, on the same synthetic set and aligned
encoder. Text-only (CapDec): parse_corpus.py embeds the training captions with the text tower the encoder was
aligned to, and train.py learns to write each caption back from its noised text embedding, never seeing an
image; DeCap's memory (evaluate.py --text_memory) projects test images onto those embeddings. Unpaired
(CgT-GAN): train.py --unpaired starts from the text-only model, with the images of one half of the training
set and the captions of the other half, a CLIP-agg reward and a tiny text discriminator. Each route is scored
on the test split by evaluate.py, and the demo ends with one line per route."""

from collections.abc import Callable
from pathlib import Path

from data.annotations import read_annotations
from data.atomic import atomic_write
from data.errors import read_json_input
from data.features import select_images, write_feature_file
from data.store import read_features
from data.synthetic import DATASET_FILE
from models.tiny import save_tiny_text_encoder

TEXT_PREFIX, UNPAIRED_PREFIX = "demo_text", "demo_unpaired"
ROUTES = ("paired", "text-only", "text-only+memory", "unpaired", "constant")
NOISE_STD = 0.126  # CapDec's noise: variance 0.016
PRETRAINED_DISCRIMINATOR = "roberta-base"


def final_checkpoint(run_dir: Path, prefix: str, epochs: int) -> Path:
    """The last epoch's checkpoint: the unpaired routes pick no epoch by the validation set's paired captions."""
    return run_dir / f"{prefix}-{epochs - 1:03d}.pt"


def write_halves(dataset_path: Path, train_features: Path, images_out: Path, corpus_out: Path) -> tuple[int, int]:
    """The training images split in two by file order: the first half's image features (their captions stay in
    the file but are never read by --unpaired), the second half's captions as a text corpus, one a line."""
    records = read_annotations(dataset_path, "train")
    half = len(records) // 2
    images = {record.image_id for record in records[:half]}
    write_feature_file(images_out, select_images(read_features(train_features), images))
    sentences = [caption for record in records[half:] for caption in record.captions]
    with atomic_write(corpus_out) as handle:
        handle.write("".join(f"{sentence}\n" for sentence in sentences).encode("utf-8"))
    return half, len(records) - half


def corpus_command(corpus: Path, split: str | None, text_encoder: str, image_encoder: Path, output: Path) -> list[str]:
    """parse_corpus.py: sentences embedded by the text tower the image encoder was aligned to."""
    return [
        *("parse_corpus.py", "--corpus", str(corpus), *(["--split", split] if split else [])),
        *("--clip_model_type", text_encoder, "--image_encoder", str(image_encoder), "--output_file", str(output)),
    ]


def route_evaluation(checkpoint: Path, test_features: Path, output: Path, memory: Path | None = None) -> list[str]:
    """evaluate.py of a checkpoint on the test split's features, CIDEr only."""
    return [
        *("evaluate.py", "--checkpoint", str(checkpoint), "--features", str(test_features)),
        *(["--text_memory", str(memory)] if memory else []),
        *("--metrics", "CIDEr", "--output", str(output)),
    ]


def unpaired_commands(options, paths: dict[str, Path], lm: str, text_encoder: str, discriminator: str) -> dict:
    """The routes' commands in three groups: before the halves are written, after, and the evaluations."""
    features, run, synthetic = paths["features"], paths["run"], paths["synthetic"]
    encoder = paths["align"] / "encoder"
    text_checkpoint = final_checkpoint(run, TEXT_PREFIX, options.epochs)
    text_only = [
        ("corpus", corpus_command(synthetic / DATASET_FILE, "train", text_encoder, encoder, features / "corpus.pkl")),
        (
            "train text-only",
            [
                *("train.py", "--data", str(features / "corpus.pkl"), "--normalize_prefix", "--noise_std", str(NOISE_STD)),
                *("--out_dir", str(run), "--prefix", TEXT_PREFIX, "--lm", lm),
                *("--epochs", str(options.epochs), "--save_every", str(options.epochs), "--bs", str(options.batch_size)),
                *("--lr", str(options.lr), "--warmup_steps", str(options.warmup_steps)),
                *("--prefix_length", str(options.prefix_length), "--seed", str(options.seed)),
                *("--cache_dir", str(paths["cache"])),
            ],
        ),
    ]
    unpaired = [
        ("corpus half", corpus_command(features / "corpus_half.txt", None, text_encoder, encoder, features / "corpus_half.pkl")),
        (
            "train unpaired",
            [
                *("train.py", "--unpaired", "--init_from", str(text_checkpoint)),
                *("--data", str(features / "train_half_images.pkl"), "--corpus", str(features / "corpus_half.pkl")),
                *("--discriminator", discriminator, "--clip_model", text_encoder, "--reward", "clip_agg+adv"),
                *("--gan_steps", str(options.gan_steps), "--gan_warm_steps", str(options.gan_warm_steps)),
                *("--disc_lr", str(options.disc_lr), "--out_dir", str(run), "--prefix", UNPAIRED_PREFIX),
                *("--epochs", str(options.unpaired_epochs), "--save_every", str(options.unpaired_epochs)),
                *("--bs", str(options.scst_bs), "--lr", str(options.scst_lr), "--seed", str(options.seed)),
                *("--cache_dir", str(paths["cache"])),
            ],
        ),
    ]
    metrics, test = paths["metrics"], features / "test.pkl"
    unpaired_checkpoint = final_checkpoint(run, UNPAIRED_PREFIX, options.unpaired_epochs)
    evaluations = [
        ("evaluate text-only", route_evaluation(text_checkpoint, test, metrics / "text-only.json")),
        (
            "evaluate text-only+memory",
            route_evaluation(text_checkpoint, test, metrics / "text-only+memory.json", features / "corpus.pkl"),
        ),
        ("evaluate unpaired", route_evaluation(unpaired_checkpoint, test, metrics / "unpaired.json")),
    ]
    return {"text-only": text_only, "unpaired": unpaired, "evaluations": evaluations}


def run_unpaired_routes(
    options,
    paths: dict[str, Path],
    lm: str,
    text_encoder: str,
    dataset_path: Path,
    run_stage: Callable[[str, list[str]], None],
) -> dict[str, float]:
    """Run the text-only and unpaired routes after the paired demo; their test CIDEr (pycocoevalcap scale)."""
    if options.pretrained:
        discriminator = PRETRAINED_DISCRIMINATOR
    else:
        captions = [caption for record in read_annotations(dataset_path, "train") for caption in record.captions]
        discriminator = str(save_tiny_text_encoder(paths["models"] / "discriminator", captions, seed=options.seed))
    commands = unpaired_commands(options, paths, lm, text_encoder, discriminator)
    for name, argv in commands["text-only"]:
        run_stage(name, argv)
    features = paths["features"]
    images, sentences = write_halves(
        dataset_path, features / "train.pkl", features / "train_half_images.pkl", features / "corpus_half.txt"
    )
    print(f"\n[halves] images of {images} training images -> --data; captions of the other {sentences} -> --corpus")
    for name, argv in commands["unpaired"] + commands["evaluations"]:
        run_stage(name, argv)
    return {
        route: read_json_input(paths["metrics"] / f"{route}.json", "metrics file")["scores"]["CIDEr"]
        for route in ("text-only", "text-only+memory", "unpaired")
    }


def format_routes(cider: dict[str, float]) -> str:
    """One line per route, `<route> test CIDEr <value>` (x100, as the tables print it)."""
    return "\n".join(f"{route} test CIDEr {100 * cider[route]:.2f}" for route in ROUTES)

