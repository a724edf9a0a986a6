"""Typed fields for TOML tables. A converter turns a raw TOML value into a typed one or
raises ValueError with the reason; check_table turns that into a ConfigError naming the
file and the dotted key. Backends declare their own fields with these."""

from __future__ import annotations

import difflib
import os
import re
import stat
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Mapping

from snapmgr.errors import ConfigError, one_line, quote
from snapmgr.model import NAME_RULE, MinFree, is_valid_name, parse_duration, parse_min_free

Converter = Callable[[Any], Any]
_MISSING = object()
MAX_COUNT = 1_000_000
# The kernel refuses longer paths (PATH_MAX, 4096 with its NUL) and longer names
# (NAME_MAX on ext4, xfs, btrfs and ZFS). A configured directory must leave room for the
# names snapmgr creates in it: `<volume>@<id>.json.tmp` and the like, under 100 bytes.
NAME_MAX = 255
PATH_MAX = 4095 - NAME_MAX - 1
_TOML_TYPES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
               list: "an array", dict: "a table"}


@dataclass(frozen=True)
class Field:
    convert: Converter
    required: bool = False
    default: Any = None


class InvalidKey(ValueError):
    """A check across several keys of a table failed; `key` is the one to change."""

    def __init__(self, key: str, reason: str):
        self.key, self.reason = key, reason
        super().__init__(reason)


def dotted(*parts: str) -> str:
    """Join key parts as TOML writes them, quoting any part that is not a bare key, with
    whatever cannot be printed in it escaped."""
    return ".".join(p if re.fullmatch(r"[A-Za-z0-9_-]+", p)
                    else '"' + one_line(p.replace("\\", "\\\\").replace('"', '\\"')) + '"' for p in parts)


def check_table(file: Path, where: tuple[str, ...], table: Any, fields: Mapping[str, Field]) -> dict:
    """Every key of `table` known, typed and converted; every required key present."""
    if not isinstance(table, dict):
        raise ConfigError(file, dotted(*where), f"expected a table, got {_type_name(table)}")
    for key in table:
        if key not in fields:
            raise ConfigError(file, dotted(*where, key), "unknown key" + did_you_mean(key, fields))
    values = {}
    for key, field in fields.items():
        raw = table.get(key, _MISSING)
        if raw is _MISSING:
            if field.required:
                raise ConfigError(file, dotted(*where, key), "missing required key")
            values[key] = field.default
            continue
        try:
            values[key] = field.convert(raw)
        except ValueError as e:
            raise ConfigError(file, dotted(*where, key), str(e)) from None
    return values


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(value: Any) -> str:
    return next((n for t, n in _TOML_TYPES.items() if type(value) is t), type(value).__name__)


def _expect(value: Any, kind: type) -> Any:
    if type(value) is not kind:
        raise ValueError(f"wrong type: expected {_TOML_TYPES[kind]}, got {_type_name(value)}")
    return value


# Converters ------------------------------------------------------------------

def string(value: Any) -> str:
    text = _expect(value, str)
    if not text:
        raise ValueError("must not be empty")
    if "\0" in text:
        # Nothing handed to the system (a path, an argument) can hold a NUL.
        raise ValueError(f"{quote(text)} contains a NUL character")
    return text


def boolean(value: Any) -> bool:
    return _expect(value, bool)


def count(value: Any) -> int:
    number = _expect(value, int)
    if not 0 <= number <= MAX_COUNT:
        raise ValueError(f"must be between 0 and {MAX_COUNT:,}, got {number}")
    return number


def port(value: Any) -> int:
    number = _expect(value, int)
    if not 0 < number < 65536:
        raise ValueError(f"must be a port number (1-65535), got {number}")
    return number


def duration(value: Any) -> timedelta:
    return parse_duration(string(value))


def min_free(value: Any) -> MinFree:
    return parse_min_free(string(value))


def name(value: Any) -> str:
    text = string(value)
    if not is_valid_name(text):
        raise ValueError(f"bad name {quote(text)}: {NAME_RULE}")
    return text


def list_of(item: Converter, non_empty: bool = False) -> Converter:
    def convert(value: Any) -> tuple:
        items = _expect(value, list)
        if non_empty and not items:
            raise ValueError("must not be empty")
        out = []
        for i, raw in enumerate(items):
            try:
                out.append(item(raw))
            except ValueError as e:
                raise ValueError(f"item {i + 1}: {e}") from None
        return tuple(out)
    return convert


def choice(*options: str) -> Converter:
    def convert(value: Any) -> str:
        text = string(value)
        if text not in options:
            raise ValueError(f"{quote(text)} is not one of {', '.join(options)}" + did_you_mean(text, options))
        return text
    return convert


def path(must_exist: bool = False, directory: bool = False) -> Converter:
    """An absolute path: a root-run tool must not depend on the directory it starts in."""
    def convert(value: Any) -> Path:
        p = Path(string(value))
        if not p.is_absolute():
            raise ValueError(f"{quote(p)} is not an absolute path")
        _check_length(p)
        if must_exist:
            _check_exists(p, directory)
        return p
    return convert


def _check_length(p: Path) -> None:
    encoded = os.fsencode(p)
    if len(encoded) > PATH_MAX:
        raise ValueError(f"path {quote(p)} is {len(encoded)} bytes long; at most {PATH_MAX} leave room "
                         f"for what snapmgr creates in it (the system's limit is 4096)")
    longest = max(encoded.split(b"/"), key=len)
    if len(longest) > NAME_MAX:
        raise ValueError(f"path {quote(p)} has a name of {len(longest)} bytes; the system's limit is {NAME_MAX}")


def _check_exists(p: Path, directory: bool) -> None:
    try:
        st = os.stat(p)
    except (FileNotFoundError, NotADirectoryError):
        raise ValueError(f"path {quote(p)} does not exist") from None
    except OSError as e:  # a symlink loop, a permission denied on the way
        raise ValueError(f"path {quote(p)} cannot be reached: {e.strerror}") from None
    if directory and not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"path {quote(p)} is not a directory")


existing_dir = path(must_exist=True, directory=True)


def mountpoint(value: Any) -> Path:
    p = existing_dir(value)
    if not os.path.ismount(p):
        raise ValueError(f"{quote(p)} is not a mountpoint (see findmnt)")
    return p


argv = list_of(string, non_empty=True)
names = list_of(name)
