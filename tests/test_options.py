"""Options defined once (data/options.py): every script's --help states the defaults its parser uses,
and the generated parser keeps train.py's range checks and usage errors."""

import argparse
import re
from dataclasses import dataclass

import pytest

import convert_features
import demo
import evaluate
import export
import parse_coco_clip
import parse_coco_dino
import predict
import train
import train_clip
from data.errors import InputError
from data.options import UsageRule, build_parser, check_ranges, option, parse_options
from tools import interpret_prefix, plot_run

# Each script with the fewest arguments it parses.
SCRIPTS = {
    "train.py": (train, ["--data", "features.pkl"]),
    "train_clip.py": (train_clip, ["--captions_file", "c.json", "--images_dir", "images", "--out_dir", "out"]),
    "predict.py": (predict, []),
    "evaluate.py": (evaluate, ["--predictions", "p.json", "--references", "r.json"]),
    "parse_coco_clip.py": (parse_coco_clip, []),
    "parse_coco_dino.py": (parse_coco_dino, []),
    "export.py": (export, ["checkpoint.pt", "out"]),
    "convert_features.py": (convert_features, ["in.pkl", "out"]),
    "demo.py": (demo, []),
    "tools/interpret_prefix.py": (interpret_prefix, ["checkpoint.pt", "--features", "f.pkl"]),
    "tools/plot_run.py": (plot_run, ["run", "--output", "run.png"]),
}
STATED_DEFAULT = re.compile(r"\(default:? ([^()]*?)\)")


def stated_defaults(module) -> dict[str, str]:
    """Each option's default as its --help states it ("(default: X)"), by destination."""
    parser = None

    def capture(self, args=None, namespace=None):
        nonlocal parser
        parser = self
        raise SystemExit(0)

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = capture
    try:
        with pytest.raises(SystemExit):
            module.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = original
    stated = {}
    for action in parser._actions:
        if action.help and action.help is not argparse.SUPPRESS:
            text = " ".join((action.help % {**vars(action), "default": action.default}).split())
            if found := STATED_DEFAULT.search(text):
                stated[action.dest] = found.group(1)
    return stated


def shown(value) -> set[str]:
    """How --help may show a value: a list as argparse's %(default)s does, or as it is typed."""
    if isinstance(value, list | tuple):
        return {str(list(value)), " ".join(map(str, value))}
    return {str(value)}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_states_the_defaults_the_parser_uses(script):
    module, argv = SCRIPTS[script]
    parsed = vars(module.parse_args(argv))
    stated = stated_defaults(module)
    for dest, text in stated.items():
        value = parsed[dest]
        if value is None or isinstance(value, bool):
            continue  # said in words ("one W&B makes up"): nothing to compare
        if dest == "warmup_steps" and script == "train.py":
            assert text.startswith(f"{value} for cross-entropy") and "0 under --scst" in text
            continue
        assert text in shown(value), f"{script} --help says {dest} defaults to {text!r}; the parser gives {value!r}"


def test_train_py_warmup_default_is_the_objectives():
    assert train.parse_args(["--data", "f.pkl"]).warmup_steps == 5000
    assert train.parse_args(["--data", "f.pkl", "--scst", "--init_from", "c.pt"]).warmup_steps == 0


@dataclass(kw_only=True)
class Example:
    data: str = option(help="input")
    epochs: int = option(10, "passes", minimum=1)
    lr: float = option(1e-3, "rate", positive=True)
    width: int = option(8, "mapper width", usage=("mapper",))
    mapper: str = option("mlp", "mapper kind", choices=["mlp", "none"])
    names: list[str] = option(["a", "b"], "some names")


RULES = (UsageRule("mapper", lambda options: options.mapper == "none", "{flags}: --mapper none has no width"),)


def test_a_generated_parser_fills_defaults_and_applies_usage_rules(capsys):
    parser = build_parser(Example, "an example")
    assert parse_options(Example, parser, ["--data", "x"], RULES) == Example(data="x")
    given = parse_options(Example, parser, ["--data", "x", "--names", "c", "--width", "4"], RULES)
    assert (given.names, given.width) == (["c"], 4)
    help_text = " ".join(parser.format_help().split())
    assert "passes (default: 10)" in help_text and "some names (default: a b)" in help_text
    assert len(stated_defaults(train)) > 25  # train.py states the default of every flag that has one
    # A flag given where a rule says it does not apply is a usage error, even at its default value.
    with pytest.raises(SystemExit):
        parse_options(Example, parser, ["--data", "x", "--mapper", "none", "--width", "8"], RULES)
    assert "--width: --mapper none has no width" in capsys.readouterr().err
    assert parse_options(Example, parser, ["--data", "x", "--mapper", "none"], RULES).width == 8


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"epochs": 0}, "--epochs 0: must be at least 1"),
        ({"lr": 0.0}, "--lr 0.0: must be positive and finite"),
        ({"lr": float("nan")}, "--lr nan: must be positive and finite"),
    ],
)
def test_ranges_are_checked_with_the_flag_named(values, message):
    with pytest.raises(InputError, match=re.escape(message)):
        check_ranges(Example(data="x", **values))
