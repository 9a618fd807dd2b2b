"""A train.py run's curves and histograms in one PNG, from its step log `{prefix}_log.jsonl`.

    python tools/plot_run.py runs/coco_mlp --output coco_mlp.png
    python tools/plot_run.py runs/coco_scst --output scst.png --predictions preds.json
    python tools/plot_run.py runs/shared --prefix scst --output scst.png   # a directory holding several runs

Curves: the training loss, the learning rate, the rewards (SCST's reward and baseline; every `reward*` figure)
and the validation loss, CIDEr and BLEU-4 where the log has them. Histograms: caption lengths in tokens (the
sampled captions' mean length per step, SCST's sample_length) or, with --predictions, in words of a COCO
results file's captions; and the per-step mean rewards. Damaged lines (a kill mid-write) are skipped and counted.
"""

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python tools/plot_run.py`

from data.atomic import atomic_write, check_outputs  # noqa: E402
from data.errors import InputError, exit_on_input_error  # noqa: E402
from data.references import read_predictions  # noqa: E402

LOG_SUFFIX = "_log.jsonl"  # stages/train_state.py's RunFiles.log: {prefix}_log.jsonl


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a train.py --out_dir")
    parser.add_argument("--output", required=True, help="the PNG to write (e.g. run.png)")
    parser.add_argument("--prefix", help="the run's --prefix; needed only when RUN_DIR holds the logs of several runs")
    parser.add_argument(
        "--predictions", help="a COCO results file [{image_id, caption}] whose caption lengths (words) to histogram"
    )
    return parser.parse_args(argv)


def find_log(run_dir: Path, prefix: str | None) -> Path:
    """The run's step log: `{prefix}_log.jsonl`, or the directory's only log when no prefix is given."""
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: not a directory (give a train.py --out_dir)")
    if prefix is not None:
        log = run_dir / f"{prefix}{LOG_SUFFIX}"
        if not log.is_file():
            raise InputError(f"{log}: no such log; is --prefix {prefix!r} this run's?")
        return log
    logs = sorted(run_dir.glob(f"*{LOG_SUFFIX}"))
    if len(logs) != 1:
        found = ", ".join(log.name[: -len(LOG_SUFFIX)] for log in logs) or "none"
        raise InputError(f"{run_dir}: holds the logs of {len(logs)} runs (prefixes: {found}); give --prefix")
    return logs[0]


def read_log(path: Path) -> tuple[list[dict[str, Any]], int]:
    """(the log's records, the number of damaged lines skipped): a line that is no JSON object with a step."""
    records, damaged = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            damaged += 1
            continue
        if isinstance(record, dict) and is_number(record.get("step")):
            records.append(record)
        else:
            damaged += 1
    return records, damaged


def is_number(value: Any) -> bool:
    """A finite int or float (a bool, a string or a NaN is no point of a curve)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def series(records: list[dict[str, Any]], name: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that hold a number for `name`."""
    points = [(record["step"], record[name]) for record in records if is_number(record.get(name))]
    return [step for step, _ in points], [value for _, value in points]


def reward_names(records: list[dict[str, Any]]) -> list[str]:
    """The log's reward figures, in the order they first appear: reward* (SCST's `reward`, others'), baseline."""
    names = dict.fromkeys(
        name for record in records for name in record if name.startswith("reward") or name == "baseline"
    )
    return [name for name in names if series(records, name)[0]]


def draw(records: list[dict[str, Any]], caption_lengths: tuple[str, list[float]], title: str) -> Figure:
    """The figure: one panel per curve or histogram that has data, two panels a row."""
    rewards = reward_names(records)
    curves = [
        (name, figures)
        for name, figures in [
            ("training loss", ["loss"]),
            ("learning rate", ["lr"]),
            ("rewards", rewards),
            ("validation loss", ["val_loss"]),
            ("validation scores", ["CIDEr", "Bleu_4"]),
        ]
        if any(series(records, figure)[0] for figure in figures)
    ]
    # Histograms: (title, {label: values}).
    histograms = [(caption_lengths[0], {"": caption_lengths[1]})] if caption_lengths[1] else []
    if drawn_rewards := {name: series(records, name)[1] for name in rewards if name.startswith("reward")}:
        histograms.append(("rewards (mean per step)", drawn_rewards))
    panels = len(curves) + len(histograms)
    columns = 2 if panels > 1 else 1
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(6 * columns, 3.5 * rows), layout="constrained")
    figure.suptitle(title)
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    for ax, (name, figures) in zip(axes, curves):
        for log_figure in figures:
            steps, values = series(records, log_figure)
            ax.plot(steps, values, label=log_figure, marker="o" if len(steps) < 20 else None)
        ax.set(title=name, xlabel="step")
        if len(figures) > 1:
            ax.legend()
    for ax, (name, groups) in zip(axes[len(curves) :], histograms):
        for label, values in groups.items():
            ax.hist(values, bins=min(30, len(set(values))), alpha=0.6 if len(groups) > 1 else 1.0, label=label or None)
        ax.set(title=name, ylabel="count")
        if len(groups) > 1:
            ax.legend()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return figure


def main(args: argparse.Namespace) -> Path:
    """Read the run's log (and --predictions), draw, write --output; returns the log read."""
    log = find_log(Path(args.run_dir), args.prefix)
    check_outputs({"--output": args.output}, {"log": log, "--predictions": args.predictions})
    records, damaged = read_log(log)
    if damaged:
        print(f"{log}: skipped {damaged} damaged line(s)", file=sys.stderr)
    if not series(records, "loss")[0]:
        raise InputError(f"{log}: no training step records (step and loss); nothing to plot")
    if args.predictions:
        words = [len(caption.split()) for caption in read_predictions(args.predictions).values()]
        caption_lengths = (f"caption length (words, {Path(args.predictions).name})", words)
    else:
        caption_lengths = ("caption length (tokens, mean per step)", series(records, "sample_length")[1])
    figure = draw(records, caption_lengths, f"{log.parent.name}/{log.name[: -len(LOG_SUFFIX)]}")
    with atomic_write(args.output, "wb") as handle:
        FigureCanvasAgg(figure).print_png(handle)
    print(f"wrote {args.output} ({len(records)} records)", file=sys.stderr)
    return log


if __name__ == "__main__":
    with exit_on_input_error():
        main(parse_args())
