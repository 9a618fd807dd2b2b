"""Sentence corpora for text-only training (parse_corpus.py), in the formats people have, detected from the
file: a text file (one sentence a line), a JSON list of strings, the captions of an annotation file (ClipCap
list, COCO captions, Karpathy with a split: data/annotations.py reads them), or a column of a parquet file.

Sentences are stripped of surrounding white space and deduplicated (first appearance kept); bad ones (empty,
longer than the limit, not UTF-8) are skipped and counted by reason."""

import collections
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from data.annotations import read_annotations
from data.errors import InputError, first_line, read_json_input

CORPUS_FORMATS = ("text", "json", "annotations", "parquet")
PARQUET_MAGIC = b"PAR1"
SKIP_REASONS = ("empty", "too long", "not UTF-8")


@dataclass
class Corpus:
    """A corpus's unique sentences in first-appearance order, and what was left out."""

    sentences: list[str]
    format: str  # one of CORPUS_FORMATS
    skipped: dict[str, int] = field(default_factory=dict)  # reason (SKIP_REASONS) -> count
    duplicates: int = 0


def detect_format(path: Path) -> str:
    """parquet, json or text, by extension (.parquet, .json, .txt), else by the first bytes."""
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".json", ".txt"):
        return {".parquet": "parquet", ".json": "json", ".txt": "text"}[suffix]
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except FileNotFoundError:
        raise InputError(f"--corpus {path}: no such file") from None
    except OSError as error:
        raise InputError(f"--corpus {path}: cannot be read ({error.strerror or error})") from None
    if head.startswith(PARQUET_MAGIC):
        return "parquet"
    return "json" if head.lstrip()[:1] in (b"[", b"{") else "text"


def _read_lines(path: Path) -> list[Any]:
    """Each line of a text file, decoded as UTF-8; a line that is not UTF-8 stays bytes (to be counted)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"--corpus {path}: no such file") from None
    except OSError as error:
        raise InputError(f"--corpus {path}: cannot be read ({error.strerror or error})") from None
    lines: list[Any] = []
    for line in data.split(b"\n"):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(line)
    if lines and lines[-1] == "":  # the newline ending the last line starts no sentence
        lines.pop()
    return lines


def _read_parquet_column(path: Path, column: str) -> list[Any]:
    try:
        names = pq.read_schema(path).names
        if column not in names:
            raise InputError(f"--corpus {path}: no column {column!r} (--parquet_column); it has {', '.join(names)}")
        values = pq.read_table(path, columns=[column]).column(column)
    except (pa.ArrowException, OSError) as error:
        raise InputError(f"--corpus {path}: not a readable parquet file ({first_line(error)})") from None
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        raise InputError(f"--corpus {path}: column {column!r} holds {values.type}, not text")
    return [value if value is not None else "" for value in values.to_pylist()]


def _read_json_sentences(path: Path, split: str | None) -> tuple[list[Any], str]:
    content = read_json_input(path, "corpus")
    if isinstance(content, list) and all(isinstance(item, str) for item in content):
        if split is not None:
            raise InputError(f"--corpus {path}: --split {split} given, but a list of sentences has no splits")
        return content, "json"
    if isinstance(content, list) and any(isinstance(item, str) for item in content):
        number = next(i for i, item in enumerate(content) if not isinstance(item, str))
        raise InputError(f"--corpus {path}: entry {number} is {type(content[number]).__name__}, not a sentence")
    records = read_annotations(path, split)  # ClipCap list, COCO captions or Karpathy: refused there if neither
    return [caption for record in records for caption in record.captions], "annotations"


def _problem(sentence: Any, max_chars: int) -> str | None:
    """Why a sentence is skipped (one of SKIP_REASONS), or None."""
    if isinstance(sentence, bytes):
        return "not UTF-8"
    try:
        sentence.encode()
    except UnicodeEncodeError:  # a lone surrogate (JSON's "\ud800"): no text
        return "not UTF-8"
    if not sentence:
        return "empty"
    return "too long" if len(sentence) > max_chars else None


def read_corpus(
    path: str | os.PathLike, *, max_chars: int, parquet_column: str | None = None, split: str | None = None
) -> Corpus:
    """The unique good sentences of a corpus file (format detected), with the counts of those left out."""
    path = Path(path)
    corpus_format = detect_format(path)
    if corpus_format == "parquet":
        if not parquet_column:
            raise InputError(f"--corpus {path} is a parquet file: name its sentence column with --parquet_column")
        raw = _read_parquet_column(path, parquet_column)
    elif parquet_column:
        raise InputError(f"--parquet_column {parquet_column}: --corpus {path} is not a parquet file")
    elif corpus_format == "json":
        raw, corpus_format = _read_json_sentences(path, split)
    else:
        raw = _read_lines(path)
    if split is not None and corpus_format != "annotations":
        raise InputError(
            f"--split {split}: only a Karpathy annotation file has splits, --corpus {path} is {corpus_format}"
        )
    return clean_sentences(raw, corpus_format, max_chars, f"--corpus {path}")


def clean_sentences(raw: list[Any], corpus_format: str, max_chars: int, where: str) -> Corpus:
    """The unique good sentences of `raw` (stripped, first appearance kept), with the counts of those left out;
    none left is an InputError naming `where`."""
    skipped: collections.Counter = collections.Counter()
    unique: dict[str, None] = {}
    for sentence in raw:
        sentence = sentence.strip()
        problem = _problem(sentence, max_chars)
        if problem is not None:
            skipped[problem] += 1
        else:
            unique.setdefault(sentence)
    kept = len(raw) - sum(skipped.values())
    if not unique:
        raise InputError(f"{where}: no usable sentence ({_describe_skipped(dict(skipped))})")
    return Corpus(list(unique), corpus_format, dict(skipped), kept - len(unique))


def _describe_skipped(skipped: dict[str, int]) -> str:
    return ", ".join(f"{skipped.get(reason, 0)} {reason}" for reason in SKIP_REASONS)


def describe_corpus(corpus: Corpus) -> str:
    """One line: sentences kept, duplicates, and the bad lines skipped by reason."""
    bad = sum(corpus.skipped.values())
    return (
        f"{len(corpus.sentences)} sentences ({corpus.format}), {corpus.duplicates} duplicates dropped, "
        f"{bad} skipped ({_describe_skipped(corpus.skipped)})"
    )
