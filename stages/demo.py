"""The demo's pipeline: a synthetic captioned set, tiny models saved to directories, then the stages
run as the real scripts (train_clip.py with --align_epochs, parse_coco_clip.py, train.py, train.py --scst,
predict.py, evaluate.py), each
in its own process, exactly as a user would type them; finally the model is compared with the best
constant caption (the most common training caption given to every test image), and the SCST model
with the cross-entropy one it started from."""

import codecs
import collections
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from data.annotations import read_annotations
from data.errors import InputError, read_json_input
from data.predictions import write_coco_results
from data.references import read_predictions
from data.synthetic import DATASET_FILE, SPLITS, attribute_accuracy, chance_levels, generate_dataset, read_scenes
from models.tiny import save_tiny_clip, save_tiny_clip_model, save_tiny_gpt2
from stages.demo_unpaired import format_routes, run_unpaired_routes
from stages.evaluate import DISPLAY_NAMES
from stages.train_clip import format_retrieval_table

REPO = Path(__file__).resolve().parents[1]
PRETRAINED_ENCODER, PRETRAINED_LM = "ViT-B/32", "gpt2"
PRETRAINED_ALIGN_TOWER = "resnet50"  # with --pretrained, the alignment stage starts from ImageNet weights
TINY_ALIGN_TOWER = "tiny_cnn"
# What the demo writes under its output directory: --overwrite removes these and nothing else.
OUTPUT_NAMES = ("synthetic", "models", "align", "features", "run", "cache", "predictions", "metrics", "sheet_test.jpg")
RUN_PREFIX, SCST_PREFIX = "demo", "demo_scst"
SCST_COMPARISON = [(model, method) for model in ("before", "after") for method in ("greedy", "beam")]
LEARNING_BAR = 4.0  # the model's test CIDEr must reach this multiple of the constant caption's


@dataclass
class DemoOptions:
    """demo.py's flags."""

    output_dir: str
    overwrite: bool
    pretrained: bool
    num_train: int
    num_val: int
    num_test: int
    epochs: int
    eval_every: int
    batch_size: int
    lr: float
    warmup_steps: int
    prefix_length: int
    clip_patch_size: int
    clip_hidden_size: int
    lm_hidden_size: int
    lm_layers: int
    scst_epochs: int
    scst_bs: int
    scst_lr: float
    align_epochs: int
    align_image_size: int
    align_bs: int
    align_lr: float
    align_train_text: bool
    decode: str
    metrics: list[str]
    seed: int
    unpaired: bool
    unpaired_epochs: int
    gan_steps: int
    gan_warm_steps: int
    disc_lr: float


@dataclass
class DemoResult:
    """The figures the demo ends with."""

    model_scores: dict[str, float]  # pycocoevalcap scale (0..1), test split
    constant_scores: dict[str, float]
    constant_caption: str
    model_attributes: dict[str, float]  # share of test images whose caption states each attribute right
    constant_attributes: dict[str, float]
    sheet: Path
    scst_cider: dict[str, float] = field(default_factory=dict)  # "greedy before", ...: test CIDEr around SCST
    retrieval: dict | None = None  # train_clip.py's retrieval.json, when the demo aligned its encoder
    route_cider: dict[str, float] = field(default_factory=dict)  # with --unpaired: test CIDEr of each route

    @property
    def scst_helped(self) -> bool | None:
        """Whether SCST raised the greedy test CIDEr (None when it did not run)."""
        if not self.scst_cider:
            return None
        return self.scst_cider["greedy after"] > self.scst_cider["greedy before"]

    @property
    def cider_ratio(self) -> float:
        """The model's test CIDEr over the constant caption's (inf when the constant scores 0)."""
        constant = self.constant_scores["CIDEr"]
        return self.model_scores["CIDEr"] / constant if constant > 0 else float("inf")

    @property
    def learned(self) -> bool:
        """Whether the model cleared the bar: LEARNING_BAR times the constant caption's CIDEr."""
        return self.cider_ratio >= LEARNING_BAR


def prepare_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty directory unless `overwrite`; then remove only what an earlier demo wrote."""
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"--output_dir {output_dir}: exists and is not a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not overwrite:
            raise InputError(f"--output_dir {output_dir}: not empty (pass --overwrite to replace the demo's outputs)")
        for name in OUTPUT_NAMES:
            path = output_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)


def build_tiny_models(options: DemoOptions, models_dir: Path, dataset_path: Path) -> tuple[str, str, str | None]:
    """A CLIP-style vision tower, a GPT-2 and (with --align_epochs) a whole tiny CLIP whose text tower reads
    the captions, the tokenizers trained on the training captions; their directories."""
    captions = [caption for record in read_annotations(dataset_path, "train") for caption in record.captions]
    text_dir = None
    if options.align_epochs > 0:  # only its text tower is used (its vision tower is the smallest there is)
        text_dir = save_tiny_clip_model(
            models_dir / "clip_text", captions, image_size=32, patch_size=16, projection_dim=64, seed=options.seed
        )
    clip_dir = save_tiny_clip(
        models_dir / "clip",
        patch_size=options.clip_patch_size,
        hidden_size=options.clip_hidden_size,
        projection_dim=options.clip_hidden_size // 2,
        seed=options.seed,
    )
    gpt2_dir = save_tiny_gpt2(
        models_dir / "gpt2",
        captions,
        hidden_size=options.lm_hidden_size,
        num_layers=options.lm_layers,
        num_heads=max(1, options.lm_hidden_size // 32),
        seed=options.seed,
    )
    return str(clip_dir), str(gpt2_dir), str(text_dir) if text_dir else None


def most_common_caption(dataset_path: Path, split: str = "train") -> str:
    """The caption written most often in `split` (the first such in file order on a tie)."""
    counts = collections.Counter(
        caption for record in read_annotations(dataset_path, split) for caption in record.captions
    )
    return counts.most_common(1)[0][0]


def write_constant_predictions(dataset_path: Path, caption: str, output: Path, split: str = "test") -> None:
    """`caption` for every image of `split`, in COCO results format."""
    write_coco_results(output, [(record.image_id, caption) for record in read_annotations(dataset_path, split)])


def alignment_command(options: DemoOptions, paths: dict[str, Path], tower: str, text_encoder: str) -> list[str]:
    """train_clip.py on the synthetic training split, validated on its val split."""
    synthetic = paths["synthetic"]
    return [
        *("train_clip.py", "--captions_file", str(synthetic / DATASET_FILE), "--images_dir", str(synthetic)),
        *("--split", "train", "--val_split", "val", "--image_encoder", tower, "--text_encoder", text_encoder),
        *(["--image_size", str(options.align_image_size)] if tower == TINY_ALIGN_TOWER else []),
        *(["--train_text"] if options.align_train_text else []),
        "--cache_images",  # 3000 small images: decoded once, not once an epoch
        *("--out_dir", str(paths["align"]), "--epochs", str(options.align_epochs), "--bs", str(options.align_bs)),
        *("--lr", str(options.align_lr), "--seed", str(options.seed), "--cache_dir", str(paths["cache"])),
        *("--warmup_steps", "50"),  # as in the tuning runs that learned shape (README, the demo section)
    ]


def stage_commands(
    options: DemoOptions, paths: dict[str, Path], encoder: str, lm: str, alignment: list[str] | None = None
) -> list[tuple[str, list[str]]]:
    """(stage name, script argv) of every stage, in order; with `alignment`, extraction uses its encoder."""
    synthetic, features = paths["synthetic"], paths["features"]
    if alignment is not None:
        encoder = str(paths["align"] / "encoder")
    commands = [("align", alignment)] if alignment is not None else []
    commands += [
        (
            f"extract {split}",
            [
                "parse_coco_clip.py",
                *("--clip_model_type", encoder, "--coco_images_dir", str(synthetic)),
                *("--captions_file", str(synthetic / DATASET_FILE), "--split", split),
                *("--output_file", str(features / f"{split}.pkl")),
            ],
        )
        for split in SPLITS
    ]
    training = [
        "train.py",
        *("--data", str(features / "train.pkl"), "--val_data", str(features / "val.pkl")),
        *("--eval_every", str(options.eval_every), "--out_dir", str(paths["run"]), "--prefix", RUN_PREFIX),
        *("--lm", lm, "--epochs", str(options.epochs), "--save_every", str(options.epochs)),
        *("--bs", str(options.batch_size), "--lr", str(options.lr), "--warmup_steps", str(options.warmup_steps)),
        *("--prefix_length", str(options.prefix_length), "--seed", str(options.seed)),
        *("--cache_dir", str(paths["cache"])),
    ]
    commands.append(("train", training))
    final_checkpoint = paths["checkpoint"]
    if options.scst_epochs > 0:
        final_checkpoint = paths["scst_checkpoint"]
        scst = [
            *("train.py", "--scst", "--init_from", str(paths["checkpoint"])),
            *("--data", str(features / "train.pkl"), "--val_data", str(features / "val.pkl"), "--eval_every", "1"),
            *("--out_dir", str(paths["run"]), "--prefix", SCST_PREFIX, "--epochs", str(options.scst_epochs)),
            *("--bs", str(options.scst_bs), "--lr", str(options.scst_lr), "--seed", str(options.seed)),
            *("--cache_dir", str(paths["cache"])),
        ]
        commands.append(("scst", scst))
    predictions = paths["predictions"]
    commands += [
        (
            "predict",
            [
                *("predict.py", str(synthetic / "test"), "--checkpoint", str(final_checkpoint)),
                *("--decode", options.decode, "--output", str(predictions / "test.json")),
                *("--sheet", str(paths["sheet"])),
            ],
        ),
    ]
    for name, predicted in (("evaluate", "test.json"), ("evaluate constant caption", "constant.json")):
        evaluation = [
            *("evaluate.py", "--predictions", str(predictions / predicted)),
            *("--references", str(synthetic / DATASET_FILE), "--split", "test"),
            *("--output", str(paths["metrics"] / predicted), "--metrics", *options.metrics),
        ]
        commands.append((name, evaluation))
    if options.scst_epochs > 0:
        for model, method in SCST_COMPARISON:
            checkpoint = paths["checkpoint"] if model == "before" else paths["scst_checkpoint"]
            comparison = [
                *("evaluate.py", "--checkpoint", str(checkpoint), "--features", str(features / "test.pkl")),
                *(
                    "--decode",
                    method,
                    "--metrics",
                    "CIDEr",
                    "--output",
                    str(paths["metrics"] / f"{model}_{method}.json"),
                ),
            ]
            commands.append((f"evaluate {method}, {model} SCST", comparison))
    return commands


def _last_line(text: str) -> str:
    """The last non-blank line of a process's output (progress bars redraw with \\r)."""
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def run_stage(name: str, argv: list[str], env: dict[str, str]) -> None:
    """Run one script from the repo root, echoing its output; a failure is one line naming the stage."""
    print(f"\n[{name}] $ python {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    decoder, tail = codecs.getincrementaldecoder("utf-8")(errors="replace"), ""
    # Chunks, not lines: progress bars end in \r and should show as they come.
    while chunk := process.stdout.read1(8192):
        text = decoder.decode(chunk)
        sys.stdout.write(text)
        sys.stdout.flush()
        tail = (tail + text)[-4000:]
    status = process.wait()
    if status != 0:
        reason = _last_line(tail).removeprefix("error: ")  # the script's own one-line error, if it gave one
        raise InputError(f"stage '{name}' ({argv[0]}) failed with exit status {status}: {reason}")
    print(f"[{name}] done in {time.perf_counter() - start:.1f} s", flush=True)


def _scores(path: Path) -> dict[str, float]:
    return read_json_input(path, "metrics file")["scores"]


def format_comparison(result: DemoResult) -> str:
    """The metrics table: the model and the constant caption side by side, x100 as papers print them."""
    lines = []
    if result.retrieval is not None:
        lines.append("alignment (train_clip.py), validation retrieval by epoch, Recall@K in %:")
        lines.append(format_retrieval_table(result.retrieval) + "\n")
    lines.append(f"{'metric':<8} {'model':>8} {'constant':>9}")
    for key, value in result.model_scores.items():
        constant = result.constant_scores.get(key)
        constant_text = f"{100 * constant:9.2f}" if constant is not None else f"{'-':>9}"
        lines.append(f"{DISPLAY_NAMES.get(key, key):<8} {100 * value:8.2f} {constant_text}")
    lines.append(f"\n{'attribute':<10} {'model':>6} {'constant':>9} {'chance':>7}   (share of test captions right)")
    for name, chance in chance_levels().items():
        model, constant = result.model_attributes[name], result.constant_attributes[name]
        lines.append(f"{name:<10} {model:6.0%} {constant:9.0%} {chance:7.0%}")
    verdict = "learned" if result.learned else "NOT learned"
    lines.append(
        f"\nconstant caption: {result.constant_caption!r}\n"
        f"CIDEr ratio model / constant: {result.cider_ratio:.2f} (the bar is {LEARNING_BAR:g}x): {verdict}\n"
        f"contact sheet of the test images: {result.sheet}"
    )
    if result.scst_cider:
        lines.append("\nSCST, test CIDEr of the cross-entropy model (before) and the SCST model (after):")
        for method in ("greedy", "beam"):
            before, after = result.scst_cider[f"{method} before"], result.scst_cider[f"{method} after"]
            lines.append(f"{method:<7} {100 * before:7.2f} -> {100 * after:7.2f}")
        lines.append(f"SCST {'raised' if result.scst_helped else 'did NOT raise'} the greedy CIDEr")
    if result.route_cider:
        lines.append("\nroutes, greedy test CIDEr (paired: the model above; constant: its caption for every image):")
        lines.append(format_routes(result.route_cider))
    return "\n".join(lines)


def check_options(options: DemoOptions) -> None:
    """Sizes the pipeline needs, checked before anything is written."""
    flags = {"batch_size": "--bs"}  # the flag's name where it differs from the field's
    for name in ("num_train", "num_val", "num_test", "epochs", "eval_every", "batch_size", "scst_bs", "align_bs"):
        if getattr(options, name) < 1:
            raise InputError(f"{flags.get(name, '--' + name)} must be at least 1, got {getattr(options, name)}")
    if options.scst_epochs < 0:
        raise InputError(f"--scst_epochs must be at least 0 (0: no SCST stage), got {options.scst_epochs}")
    if options.align_epochs < 0:
        raise InputError(
            f"--align_epochs must be at least 0 (0: the encoder is not aligned), got {options.align_epochs}"
        )
    if options.unpaired and (options.align_epochs == 0 or options.align_train_text):
        raise InputError(
            "--unpaired needs the aligned encoder (--align_epochs above 0, without --align_train_text): text-only "
            "training stands text embeddings in for image features, so the images must be in the frozen text tower's space"
        )
    for name in ("unpaired_epochs", "gan_steps", "gan_warm_steps"):
        if options.unpaired and getattr(options, name) < (1 if name == "unpaired_epochs" else 0):
            raise InputError(f"--{name} must be at least {1 if name == 'unpaired_epochs' else 0}, got {getattr(options, name)}")
    if "CIDEr" not in options.metrics:
        options.metrics = [*options.metrics, "CIDEr"]  # the learning bar is a CIDEr ratio


def run_demo(options: DemoOptions) -> DemoResult:
    """Generate the set, build or name the models, run every stage, score the constant caption."""
    check_options(options)
    output_dir = Path(options.output_dir).resolve()
    prepare_output_dir(output_dir, options.overwrite)
    paths = {name: output_dir / name for name in ("synthetic", "models", "align", "features", "run", "cache")}
    paths |= {"predictions": output_dir / "predictions", "metrics": output_dir / "metrics"}
    paths["sheet"] = output_dir / "sheet_test.jpg"
    paths["checkpoint"] = paths["run"] / f"{RUN_PREFIX}_best.pt"  # with --eval_every: the best validation CIDEr
    paths["scst_checkpoint"] = paths["run"] / f"{SCST_PREFIX}_best.pt"

    print("\n[generate] the synthetic captioned set", flush=True)
    dataset_path = generate_dataset(
        paths["synthetic"],
        num_train=options.num_train,
        num_val=options.num_val,
        num_test=options.num_test,
        seed=options.seed,
    )
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if options.pretrained:
        encoder, lm, text_encoder, tower = PRETRAINED_ENCODER, PRETRAINED_LM, PRETRAINED_ENCODER, PRETRAINED_ALIGN_TOWER
    else:
        print(f"\n[models] tiny CLIP towers and GPT-2 with random weights in {paths['models']}", flush=True)
        encoder, lm, text_encoder = build_tiny_models(options, paths["models"], dataset_path)
        tower = TINY_ALIGN_TOWER
        env["HF_HUB_OFFLINE"] = "1"  # everything is local: never wait on the hub
    alignment = alignment_command(options, paths, tower, text_encoder) if options.align_epochs > 0 else None
    constant_caption = most_common_caption(dataset_path)
    write_constant_predictions(dataset_path, constant_caption, paths["predictions"] / "constant.json")
    for name, argv in stage_commands(options, paths, encoder, lm, alignment):
        run_stage(name, argv, env)
    route_cider = {}
    if options.unpaired:
        route_cider = run_unpaired_routes(
            options, paths, lm, text_encoder, dataset_path, lambda name, argv: run_stage(name, argv, env)
        )
        route_cider |= {"paired": _scores(paths["metrics"] / "test.json")["CIDEr"]}
        route_cider |= {"constant": _scores(paths["metrics"] / "constant.json")["CIDEr"]}
    scenes = read_scenes(dataset_path, "test")
    return DemoResult(
        model_scores=_scores(paths["metrics"] / "test.json"),
        constant_scores=_scores(paths["metrics"] / "constant.json"),
        constant_caption=constant_caption,
        model_attributes=attribute_accuracy(scenes, read_predictions(paths["predictions"] / "test.json")),
        constant_attributes=attribute_accuracy(scenes, read_predictions(paths["predictions"] / "constant.json")),
        sheet=paths["sheet"],
        scst_cider={
            f"{method} {model}": _scores(paths["metrics"] / f"{model}_{method}.json")["CIDEr"]
            for model, method in SCST_COMPARISON
            if options.scst_epochs > 0
        },
        retrieval=read_json_input(paths["align"] / "retrieval.json", "retrieval file") if alignment else None,
        route_cider=route_cider,
    )
