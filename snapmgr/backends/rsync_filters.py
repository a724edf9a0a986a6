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

import os
import re
from pathlib import PurePosixPath
from typing import Callable, Sequence

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


def matcher(rules: Sequence[str]) -> Callable[[bytes, bool], bool]:
    """Whether rsync's `--exclude` rules leave out a path (relative to the source, given
    with whether it is a directory): the first rule that matches decides, as in rsync.
    A path below an excluded directory is the caller's to skip (rsync never descends)."""
    if "!" in rules:
        rules = rules[len(rules) - rules[::-1].index("!"):]
    compiled = [_compiled(rule) for rule in rules]

    def excluded(path: bytes, is_dir: bool) -> bool:
        name = path.rsplit(b"/", 1)[-1]
        for include, dirs_only, whole_path, regex in compiled:
            if (is_dir or not dirs_only) and regex.fullmatch(path if whole_path else name):
                return not include
        return False
    return excluded


def _compiled(rule: str) -> tuple[bool, bool, bool, re.Pattern]:
    """(include, directories only, matched against the whole path, regex) of one rule."""
    include = rule.startswith("+ ")
    pattern = rule[2:] if rule[:2] in ("+ ", "- ") else rule
    dirs_only = pattern.endswith("/") and pattern != "/"
    pattern = pattern.rstrip("/") if dirs_only else pattern
    anchored = pattern.startswith("/")
    pattern = pattern.lstrip("/") if anchored else pattern
    whole_path = anchored or "/" in pattern or "**" in pattern
    regex = _regex(os.fsencode(pattern))
    if whole_path and not anchored:   # any tail of the path that starts at a component
        regex = b"(?:.*/)?" + regex
    if pattern.endswith("/***"):      # the directory itself, and everything in it
        regex = _regex(os.fsencode(pattern[:-4])) + b"(?:/.*)?"
        regex = regex if anchored else b"(?:.*/)?" + regex
    return include, dirs_only, whole_path, re.compile(regex, re.S)


def _regex(pattern: bytes) -> bytes:
    """rsync's wildcards: '**' anything, '*' and '?' within one component, [...] a class;
    a backslash escapes a wildcard in a pattern that has one."""
    if not WILDCARDS & set(pattern.decode("latin-1")):
        return re.escape(pattern)
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i:i + 1]
        if c == b"\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1:i + 2]))
            i += 2
        elif pattern.startswith(b"**", i):
            out.append(b".*")
            i += 2
        elif c == b"*":
            out.append(b"[^/]*")
            i += 1
        elif c == b"?":
            out.append(b"[^/]")
            i += 1
        elif c == b"[" and (end := pattern.find(b"]", i + 2)) != -1:
            body = pattern[i + 1:end]
            out.append(b"[" + (b"^" + body[1:] if body[:1] == b"!" else body) + b"]")
            i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return b"".join(out)
