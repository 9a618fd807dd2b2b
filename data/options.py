"""Command-line options defined once: each option is a dataclass field whose metadata holds its help,
flag, minimum, choices, group and usage rules; the argparse parser, the defaults shown by `--help`, the
range checks and the "given where it does not apply" errors are all generated from those fields.

    @dataclass
    class Options:
        epochs: int = option(10, "passes over the data", minimum=1)

    parser = build_parser(Options, __doc__, GROUPS)
    options = parse_options(Options, parser, argv, RULES)  # an Options, every field set
"""

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass
from typing import Any

from data.errors import InputError

UNSET = object()  # a flag not given on the command line (parse_options tells them from flags given)


@dataclass(frozen=True)
class UsageRule:
    """Flags that name this rule in their `usage` are an error when `applies(options)`; `message` names
    them as {flags}."""

    name: str
    applies: Callable[[Any], bool]
    message: str


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    aliases: tuple[str, ...] = (),
    minimum: float | None = None,
    positive: bool = False,
    choices: Sequence[str] | None = None,
    group: str | None = None,
    usage: tuple[str, ...] = (),
    metavar: str | None = None,
    positional: bool = False,
    shown_default: str | None = None,
    hidden: bool = False,
) -> Any:
    """A dataclass field that is also a command-line option.

    `flag`: the flag's name without dashes, where it is not the field's (`bs` for batch_size); `aliases`:
    other names it also answers to (ClipCap's `gpt2` for `lm`).
    `minimum`: the smallest value accepted; `positive`: above 0 and finite. `usage`: the names of the
    UsageRules under which giving this flag is an error. `shown_default`: what --help says where the
    default is resolved later (None fields that another setting fills in). `hidden`: not in --help."""
    metadata = {
        "help": help,
        "flag": flag,
        "aliases": aliases,
        "minimum": minimum,
        "positive": positive,
        "choices": choices,
        "group": group,
        "usage": usage,
        "metavar": metavar,
        "positional": positional,
        "shown_default": shown_default,
        "hidden": hidden,
    }
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def option_fields(options_class: type) -> list[dataclasses.Field]:
    """The fields of `options_class` that are command-line options."""
    return [field for field in dataclasses.fields(options_class) if "help" in field.metadata]


def flag_name(field: dataclasses.Field) -> str:
    """The command-line spelling of a field: `--bs` for batch_size."""
    return field.name if field.metadata["positional"] else f"--{field.metadata['flag'] or field.name}"


def default_of(field: dataclasses.Field) -> Any:
    """The field's default value (a fresh copy for a list)."""
    return field.default_factory() if field.default_factory is not MISSING else field.default


def option_defaults(options_class: type) -> dict[str, Any]:
    """Every option's default, by field name."""
    return {field.name: default_of(field) for field in option_fields(options_class)}


def default_text(field: dataclasses.Field) -> str:
    """What --help says of the default."""
    if field.metadata["shown_default"] is not None:
        return field.metadata["shown_default"]
    default = default_of(field)
    if default is MISSING or default is None or default is False:
        return ""
    return " ".join(map(str, default)) if isinstance(default, list) else str(default)


def _value_type(annotation: Any) -> tuple[type, bool]:
    """(the element type argparse converts to, whether the option takes a list) of a field's annotation."""
    arguments = [argument for argument in typing.get_args(annotation) if argument is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return _value_type(arguments[0])
    if typing.get_origin(annotation) is list:
        return arguments[0], True
    return annotation, False


def build_parser(
    options_class: type, description: str | None, groups: dict[str, str] | None = None
) -> argparse.ArgumentParser:
    """An argparse parser of every option field, in field order, under the titles of `groups`."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser, options_class, groups)
    return parser


def add_options(parser: argparse.ArgumentParser, options_class: type, groups: dict[str, str] | None = None) -> None:
    """Every option field of `options_class` as an argument of `parser`, under the titles of `groups`."""
    sections = {name: parser.add_argument_group(title) for name, title in (groups or {}).items()}
    hints = typing.get_type_hints(options_class)
    for field in option_fields(options_class):
        add_option(sections.get(field.metadata["group"], parser), field, hints[field.name])


def add_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, field: dataclasses.Field, annotation: Any) -> None:
    """One field as an argument of `parser`, its default shown in the help."""
    meta = field.metadata
    shown = default_text(field)
    help_text = argparse.SUPPRESS if meta["hidden"] else f"{meta['help']} (default: {shown})" if shown else meta["help"]
    value_type, many = _value_type(annotation)
    if meta["positional"]:
        parser.add_argument(field.name, nargs="*", metavar=meta["metavar"], help=help_text, default=default_of(field))
        return
    default = default_of(field)
    keywords: dict[str, Any] = {"help": help_text, "default": None if default is MISSING else default, "dest": field.name}
    if value_type is bool:
        keywords["action"] = "store_true"
    else:
        keywords.update(type=value_type, choices=meta["choices"], metavar=meta["metavar"])
        if many:
            keywords["nargs"] = "+"
    if default is MISSING:
        keywords["required"] = True
    parser.add_argument(flag_name(field), *(f"--{alias}" for alias in meta["aliases"]), **keywords)


def parse_options(
    options_class: type,
    parser: argparse.ArgumentParser,
    argv: list[str] | None = None,
    rules: Sequence[UsageRule] = (),
) -> Any:
    """Parse `argv` into an `options_class`, then refuse flags given where a usage rule says they do not apply."""
    fields = option_fields(options_class)
    # argparse sets a default only where the namespace lacks the name: so UNSET stays where no flag was given.
    namespace = parser.parse_args(argv, argparse.Namespace(**{field.name: UNSET for field in fields}))
    given = {name for name, value in vars(namespace).items() if value is not UNSET}
    options = options_class(**{field.name: getattr(namespace, field.name) if field.name in given else default_of(field) for field in fields})
    for rule in rules:
        offending = [
            flag_name(field)
            for field in fields
            if rule.name in field.metadata["usage"] and field.name in given
        ]
        if offending and rule.applies(options):
            parser.error(rule.message.format(flags=", ".join(offending)))
    return options


def check_ranges(options: Any) -> None:
    """Every option with a minimum (or that must be positive) in range: one InputError line naming the flag."""
    for field in option_fields(type(options)):
        value, meta = getattr(options, field.name), field.metadata
        if value is None or (meta["minimum"] is None and not meta["positive"]):
            continue
        flag = flag_name(field)
        if meta["positive"] and not 0 < value < math.inf:  # written so that NaN fails too
            raise InputError(f"{flag} {value}: must be positive and finite")
        if isinstance(value, float) and not math.isfinite(value):  # NaN would pass `value < minimum`
            raise InputError(f"{flag} {value}: must be a finite number")
        if meta["minimum"] is not None and value < meta["minimum"]:
            raise InputError(f"{flag} {value}: must be at least {meta['minimum']}")
