"""What rsync's `--exclude` rules surely keep out of a copy, for the checks that must not
guess (a repository inside its own source).

rsync (man rsync, FILTER RULES) matches a path against the rules in order and the first
match wins; `!` clears the rules before it; a rule may start with `+ ` (include) or `- `
(exclude); a pattern starting with `/` is anchored at the source, one without any `/`
(but a trailing one) matches a name at any depth, a trailing `/` matches directories
only. A backslash escapes a wildcard, but only in a pattern that has a wildcard. A rule
that might match (wildcards, unanchored paths) is not guessed at: an exclude of that kind
does not count, an include of that kind is taken to match."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Sequence

WILDCARDS = frozenset("*?[")


def surely_excluded(rules: Sequence[str], inside: PurePosixPath) -> bool:
    """Whether `inside` (a directory, relative to the source) is surely left out: some
    directory on the way to it, or itself, is surely excluded by the first rule that
    matches it."""
    if "!" in rules:
        rules = rules[len(rules) - rules[::-1].index("!"):]
    return any(_surely_excluded(rules, d) for d in reversed([inside, *inside.parents][:-1]))


def _surely_excluded(rules: Sequence[str], path: PurePosixPath) -> bool:
    for rule in rules:
        include = rule.startswith("+ ")
        matches = _matches(rule[2:] if rule[:2] in ("+ ", "- ") else rule, path)
        if matches or (matches is None and include):
            return matches is True and not include
    return False


def anchored(inside: PurePosixPath) -> str:
    """The rule that excludes exactly `inside` and what is below it."""
    text = str(inside)
    if WILDCARDS & set(text):
        text = "".join("\\" + c if c in WILDCARDS | {"\\"} else c for c in text)
    return f"/{text}/"


def _matches(pattern: str, path: PurePosixPath) -> bool | None:
    """Whether the pattern matches the directory `path`; None when that cannot be told
    without rsync's own matcher (wildcards)."""
    literal = _literal(pattern)
    if literal is None:
        return None
    name = literal.rstrip("/")
    if name.startswith("/"):
        return name == f"/{path}"
    return f"/{path}".endswith(f"/{name}")  # a name, or the last components of the path


def _literal(pattern: str) -> str | None:
    """The pattern's text when it has no live wildcard, else None."""
    if not WILDCARDS & set(pattern):
        return pattern  # no wildcard: a backslash is just a character
    out, i = [], 0
    while i < len(pattern):
        if pattern[i] == "\\" and i + 1 < len(pattern):
            out.append(pattern[i + 1])
            i += 2
        elif pattern[i] in WILDCARDS:
            return None
        else:
            out.append(pattern[i])
            i += 1
    return "".join(out)
