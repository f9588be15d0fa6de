"""Text files the package reads (manifests, YAML configs, JSON indexes, query lists): decoded as UTF-8, and an
undecodable byte or malformed JSON is an error that names the file, the line and column, and what was expected."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any


class TextFileError(ValueError):
    """A text file that is not UTF-8, or not the JSON it should be."""


def read_text(path: str | os.PathLike, what: str) -> str:
    """The file's text; TextFileError naming line and column of the first byte that is not UTF-8."""
    p = pathlib.Path(path)
    if p.is_dir():
        raise TextFileError(f"{what} {str(p)!r} is a folder, not a file")
    data = p.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise TextFileError(
            f"{what} {str(p)!r}, line {line}, column {column}: byte 0x{data[exc.start]:02x} is not UTF-8 "
            "(the file must be UTF-8 text; convert it, e.g. with iconv -t UTF-8)"
        ) from None


def read_json(path: str | os.PathLike, what: str, expect: type | None = dict) -> Any:
    """The file's JSON document; TextFileError naming the line and column of a syntax error, or the type found
    when it is not `expect`."""
    text = read_text(path, what)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TextFileError(f"{what} {str(path)!r}, line {exc.lineno}, column {exc.colno}: not valid JSON "
                            f"({exc.msg})") from None  # fmt: skip
    if expect is not None and not isinstance(doc, expect):
        raise TextFileError(f"{what} {str(path)!r}: expected a JSON {expect.__name__}, got {type(doc).__name__}")
    return doc
