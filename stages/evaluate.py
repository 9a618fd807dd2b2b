"""Caption metrics computed as the COCO caption toolkit (pycocoevalcap) computes them: the PTB
tokenizer, then BLEU-1..4, METEOR, ROUGE-L, CIDEr(-D) and, when it can run, SPICE; overall and
per image; and evaluate.py's run. The metrics serve training-time evaluation too."""

import argparse
import math
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer
from transformers import PreTrainedTokenizerBase

from data.atomic import check_outputs, write_json_atomic
from data.errors import InputError
from data.features import FeatureFile
from data.references import (
    ImageId,
    check_matching_ids,
    describe_empty_captions,
    load_references,
    read_predictions,
    references_from_features,
)
from data.store import read_features
from models.captioner import ClipCaptionModel
from models.checkpoint import captioner_tokenizer
from models.decoding import DecodingOptions, decoding_options_from_args
from models.device import resolve_device, resolve_precision
from models.hf_export import load_captioner
from models.text_memory import memory_temperature
from stages.predict import caption_feature_file, check_features_fit, read_text_memory

# Metric groups as pycocoevalcap names them, and the score keys each one yields.
METRIC_KEYS = {
    "Bleu": ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"),
    "METEOR": ("METEOR",),
    "ROUGE_L": ("ROUGE_L",),
    "CIDEr": ("CIDEr",),
    "SPICE": ("SPICE",),
}
DEFAULT_METRICS = ("Bleu", "METEOR", "ROUGE_L", "CIDEr")  # SPICE only when asked: it needs a model download
DISPLAY_NAMES = {
    "Bleu_1": "BLEU-1",
    "Bleu_2": "BLEU-2",
    "Bleu_3": "BLEU-3",
    "Bleu_4": "BLEU-4",
    "METEOR": "METEOR",
    "ROUGE_L": "ROUGE-L",
    "CIDEr": "CIDEr",
    "SPICE": "SPICE",
    "CLIP-S": "CLIP-S",
    "RefCLIP-S": "RefCLIP-S",
}
JAVA_HELP = (
    "METEOR and the PTB tokenizer (used by every metric) need Java 8 or newer, and `java` is not on the PATH: "
    "install a JRE (e.g. `sudo apt-get install default-jre`, `conda install -c conda-forge openjdk` "
    "or `brew install openjdk`) and run again"
)
_PACKAGE_DIR = Path(ptbtokenizer.__file__).resolve().parents[1]  # pycocoevalcap is a namespace package
_PTB_JAR = _PACKAGE_DIR / "tokenizer" / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR
_SPICE_CORENLP_JAR = _PACKAGE_DIR / "spice" / "lib" / "stanford-corenlp-3.6.0.jar"


@dataclass
class Scores:
    """Corpus-level scores (0..1, as pycocoevalcap returns them), per-image scores, and skipped metrics."""

    overall: dict[str, float]
    per_image: dict[ImageId, dict[str, float | None]]
    skipped: dict[str, str] = field(default_factory=dict)  # metric -> why it did not run


def require_java() -> None:
    """Fail with one line saying how to install Java when it is missing."""
    if shutil.which("java") is None:
        raise InputError(JAVA_HELP)


def check_metrics(metrics: Iterable[str]) -> tuple[str, ...]:
    """The metric groups, checked against METRIC_KEYS."""
    metrics = tuple(metrics)
    unknown = [metric for metric in metrics if metric not in METRIC_KEYS]
    if unknown or not metrics:
        raise InputError(f"unknown metric(s) {unknown or '(none given)'}; choose from {', '.join(METRIC_KEYS)}")
    return metrics


def ptb_tokenize(captions: dict[Any, list[str]]) -> dict[Any, list[str]]:
    """pycocoevalcap's PTB tokenization (same jar, flags and punctuation removal), one sentence per line.

    The toolkit's own wrapper writes its temporary file into site-packages and ignores Java
    failures, which misaligns captions silently; this one checks both."""
    require_java()
    keys = [key for key, sentences in captions.items() for _ in sentences]
    # Any line break inside a caption (including \r and \u2028, which Java also splits on) would shift
    # every later line; whitespace only separates tokens, so collapsing it changes no token.
    lines = [" ".join(sentence.split()) for sentences in captions.values() for sentence in sentences]
    with tempfile.TemporaryDirectory() as directory:
        input_path = Path(directory) / "sentences.txt"
        input_path.write_text("\n".join(lines), encoding="utf-8")
        command = [
            "java",
            "-cp",
            str(_PTB_JAR),
            "edu.stanford.nlp.process.PTBTokenizer",
            "-preserveLines",
            "-lowerCase",
        ]
        result = subprocess.run([*command, str(input_path)], capture_output=True)
    output = result.stdout.decode("utf-8").split("\n")
    if result.returncode != 0 or len(output) < len(lines):
        reason = result.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [
            f"exit status {result.returncode}"
        ]
        raise InputError(f"the PTB tokenizer (java) failed on {len(lines)} captions: {reason[0]}")
    tokenized: dict[Any, list[str]] = {key: [] for key in captions}
    for key, line in zip(keys, output):
        tokenized[key].append(
            " ".join(word for word in line.rstrip().split(" ") if word not in ptbtokenizer.PUNCTUATIONS)
        )
    return tokenized


def _spice_unavailable_reason() -> str | None:
    if not _SPICE_CORENLP_JAR.is_file():
        return (
            "SPICE needs the Stanford CoreNLP 3.6.0 models (about 1 GB): download them once with "
            "`python -m pycocoevalcap.spice.get_stanford_models`"
        )
    return None


def _meteor_score(gts: dict, res: dict) -> tuple[float, list[float]]:
    """pycocoevalcap's METEOR, with its Java process stopped however scoring ends."""
    meteor = Meteor()
    try:
        return meteor.compute_score(gts, res)
    except (ValueError, BrokenPipeError) as error:  # the JVM did not start or died (e.g. no memory for -Xmx2G)
        meteor.meteor_p.kill()
        reason = meteor.meteor_p.stderr.read().decode("utf-8", "replace").strip().splitlines()[-1:] or [str(error)]
        raise InputError(f"METEOR (java -Xmx2G -jar meteor-1.5.jar) failed: {reason[0]}") from None
    finally:
        if meteor.lock.locked():  # a failed compute_score keeps its lock, and Meteor.__del__ would wait on it forever
            meteor.lock.release()


def _run_scorer(metric: str, gts: dict, res: dict) -> tuple[Any, Any]:
    """(overall, per-image) from pycocoevalcap's scorer for one metric group, in gts's key order."""
    if metric == "Bleu":
        return Bleu(4).compute_score(gts, res, verbose=0)
    if metric == "ROUGE_L":
        return Rouge().compute_score(gts, res)
    if metric == "CIDEr":
        return Cider().compute_score(gts, res)
    if metric == "METEOR":
        return _meteor_score(gts, res)
    if metric == "SPICE":
        from pycocoevalcap.spice.spice import Spice  # imported late: its module reaches for a download helper

        overall, per_image = Spice().compute_score(gts, res)
        # Spice scores images in sorted id order, not in gts's order (COCOEvalCap mislabels them).
        by_id = dict(zip(sorted(gts), per_image))
        return overall, [by_id[image_id]["All"]["f"] for image_id in gts]
    raise InputError(f"unknown metric {metric!r}")


def _finite_or_none(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None  # SPICE gives NaN for some images; JSON has no NaN


def score_captions(
    predictions: dict[ImageId, str], references: dict[ImageId, list[str]], metrics: Sequence[str] = DEFAULT_METRICS
) -> Scores:
    """Score one caption per image against its references, as the COCO toolkit does."""
    metrics = check_metrics(metrics)
    check_matching_ids(predictions, references, allow_missing=False)
    if not predictions:
        raise InputError("no captions to score")
    # Both sides go through one tokenizer run: -preserveLines tokenizes each line on its own.
    tokenized = ptb_tokenize(
        {**{("ref", i): r for i, r in references.items()}, **{("res", i): [predictions[i]] for i in references}}
    )
    gts = {image_id: tokenized[("ref", image_id)] for image_id in references}
    res = {image_id: tokenized[("res", image_id)] for image_id in references}
    overall: dict[str, float] = {}
    per_image: dict[ImageId, dict[str, float | None]] = {image_id: {} for image_id in references}
    skipped: dict[str, str] = {}
    for metric in metrics:
        if metric == "SPICE" and (reason := _spice_unavailable_reason()) is not None:
            skipped[metric] = reason
            continue
        try:
            score, image_scores = _run_scorer(metric, gts, res)
        except (OSError, subprocess.CalledProcessError) as error:  # SPICE's java run; it is optional
            if metric != "SPICE":
                raise
            skipped[metric] = f"SPICE failed ({error}); SPICE 1.0 is known to need Java 8"
            continue
        keys = METRIC_KEYS[metric]
        # Bleu returns four scores and four per-image lists; the others one of each.
        scores, image_lists = (score, image_scores) if len(keys) > 1 else ([score], [image_scores])
        for key, value, values in zip(keys, scores, image_lists):
            overall[key] = float(value)
            for image_id, image_value in zip(gts, values):
                per_image[image_id][key] = _finite_or_none(image_value)
    return Scores(overall=overall, per_image=per_image, skipped=skipped)


def score_captioner(
    model: ClipCaptionModel,
    tokenizer: PreTrainedTokenizerBase,
    feature_file: FeatureFile,
    options: DecodingOptions,
    *,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    metrics: Sequence[str] = ("Bleu", "CIDEr"),
) -> tuple[dict[str, float], dict[ImageId, str]]:
    """Caption a feature file's images and score them against its own captions: ({"Bleu_4": ..., "CIDEr": ...},
    each image's caption)."""
    captioned = caption_feature_file(
        model,
        tokenizer,
        feature_file,
        options,
        batch_size=batch_size,
        device=device,
        precision=precision,
        progress=False,
    )
    predictions = {image_id: captions[0] for image_id, captions in captioned}  # the best caption of each image
    return score_captions(predictions, references_from_features(feature_file), metrics).overall, predictions


def metrics_report(scores: Scores, predictions: dict[ImageId, str], settings: dict[str, Any]) -> dict[str, Any]:
    """The metrics JSON: scores (0..1), skipped metrics, settings, and each image's caption and scores."""
    per_image = [
        {"image_id": image_id, "caption": predictions[image_id], **image_scores}
        for image_id, image_scores in scores.per_image.items()
    ]
    return {"scores": scores.overall, "skipped": scores.skipped, "settings": settings, "per_image": per_image}


def format_table(report: dict[str, Any]) -> str:
    """The scores x100, as papers print them, one metric a line; skipped metrics with their reason."""
    lines = [f"{'metric':<9} {'score':>7}"]
    lines += [f"{DISPLAY_NAMES.get(key, key):<9} {100 * value:7.2f}" for key, value in report["scores"].items()]
    lines += [f"{DISPLAY_NAMES.get(key, key):<9} skipped: {reason}" for key, reason in report["skipped"].items()]
    lines.append(f"{'images':<9} {report['settings']['image_count']:>7}")
    return "\n".join(lines)


def _check_sources(args: argparse.Namespace) -> None:
    if args.checkpoint is not None:
        if args.features is None or args.predictions is not None:
            raise InputError("--checkpoint needs --features (the images to caption) and no --predictions")
    elif args.predictions is None or args.references is None or args.features is not None:
        raise InputError("give --checkpoint X.pt --features FILE, or --predictions FILE --references FILE")
    if args.batch_size < 1:
        raise InputError(f"--batch_size {args.batch_size}: must be at least 1")
    if args.text_memory is not None and args.checkpoint is None:
        raise InputError("--text_memory projects the features a --checkpoint captions: give --checkpoint too")
    inputs = ("checkpoint", "features", "predictions", "references", "text_memory")
    check_outputs({"--output": args.output}, {f"--{name}": getattr(args, name) for name in inputs})


def run_evaluation(args: argparse.Namespace) -> dict:
    """evaluate.py's run: caption (with --checkpoint) or read predictions, score them, print the table; returns the report."""
    _check_sources(args)
    metrics = check_metrics([*args.metrics, *(["SPICE"] if args.spice else [])])
    print("evaluate.py:", ", ".join(f"{name}={value}" for name, value in vars(args).items()))
    require_java()  # before any decoding: every metric tokenizes with Java
    references_name = args.references or args.features
    all_references = load_references(references_name, args.split)
    if args.checkpoint is not None:
        options = decoding_options_from_args(args)
        device = resolve_device(args.device)
        precision = resolve_precision(args.precision, device)
        feature_file = read_features(args.features)
        predicted_ids, predictions_name = feature_file.image_rows(), f"the images of {args.features}"
    else:
        predictions = read_predictions(args.predictions)
        predicted_ids, predictions_name = predictions, args.predictions
    # Ids are paired before decoding, which can take long, so that a mismatch fails at once.
    references = check_matching_ids(
        predicted_ids,
        all_references,
        allow_missing=args.allow_missing,
        predictions_name=predictions_name,
        references_name=references_name,
    )
    split = args.split if args.checkpoint is None else feature_file.meta.get("split")
    settings = {
        "metrics": list(metrics),
        "references": references_name,
        "split": split,
        "image_count": len(references),
        "images_without_prediction": len(all_references) - len(references),  # > 0 only with --allow_missing
    }
    if args.checkpoint is not None:
        model = load_captioner(args.checkpoint, map_location=device).to(device)
        check_features_fit(feature_file, model, args.features)
        memory = read_text_memory(args.text_memory, model, memory_temperature(args))
        captioned = caption_feature_file(
            model,
            captioner_tokenizer(model),
            feature_file,
            options,
            batch_size=args.batch_size,
            device=device,
            precision=precision,
            progress=True,
            memory=memory,
        )
        predictions = {image_id: captions[0] for image_id, captions in captioned}  # the best caption of each image
        settings.update(
            checkpoint=args.checkpoint, features=args.features, decoding=asdict(options), precision=precision
        )
        if memory is not None:
            settings.update(text_memory=args.text_memory, memory_temperature=memory.temperature)
    else:
        settings.update(predictions=args.predictions)
    if (warning := describe_empty_captions(predictions, predictions_name)) is not None:
        print(warning)
    scores = score_captions({image_id: predictions[image_id] for image_id in references}, references, metrics)
    if args.clip_score:  # imported late: the CLIP scorer and image encoding are needed only here
        from stages.clip_metrics import clip_scores

        overall, per_image = clip_scores(args, predictions, references, feature_file if args.checkpoint else None)
        scores.overall.update(overall)
        for image_id, image_scores in per_image.items():
            scores.per_image[image_id].update(image_scores)
        settings["clip_score"] = args.clip_score
    report = metrics_report(scores, predictions, settings)
    print(format_table(report))
    if settings["images_without_prediction"]:
        print(f"left out (--allow_missing): {settings['images_without_prediction']} images without a prediction")
    if args.output:
        write_json_atomic(args.output, report)
        print(f"wrote {args.output}")
    return report
