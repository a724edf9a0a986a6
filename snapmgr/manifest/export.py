"""A manifest in the formats standard tools check: `b3sum -c` and `sha256sum -c`, run
inside a restored copy, check every regular file against the hash it had in the snapshot.

Both tools write a name holding a backslash or a newline escaped, the line then starting
with a backslash; sha256sum (coreutils 9) escapes a carriage return as well, b3sum (1.2)
writes it as it is. b3sum cannot check a name that is not UTF-8 (it reads the list as
text), so such a name makes the b3sum export fail rather than print a line that cannot
match: the sha256sum format, or a sha256 manifest, carries any name."""

from __future__ import annotations

import base64
import json
from typing import Iterable, Iterator

from snapmgr.errors import SnapmgrError
from snapmgr.manifest.entry import Entry, display, path_text

FORMATS = {"b3sum": "blake3", "sha256sum": "sha256", "json": None}
_ESCAPED = {"b3sum": {b"\\": b"\\\\", b"\n": b"\\n"},
            "sha256sum": {b"\\": b"\\\\", b"\n": b"\\n", b"\r": b"\\r"}}


class Unrepresentable(SnapmgrError):
    pass


def default_format(algorithm: str) -> str:
    return next(f for f, a in FORMATS.items() if a == algorithm)


def check_format(fmt: str, algorithm: str) -> None:
    wanted = FORMATS[fmt]
    if wanted is not None and wanted != algorithm:
        raise SnapmgrError(f"this manifest holds {algorithm} hashes; --format {fmt} needs {wanted} "
                           f"(use --format {default_format(algorithm)})")


def checksum_lines(entries: Iterable[Entry], fmt: str) -> Iterator[bytes]:
    """`HASH  NAME` for each regular file, as `fmt` writes and checks it."""
    escapes = _ESCAPED[fmt]
    for e in entries:
        if e.kind != "f":
            continue
        if fmt == "b3sum":
            try:
                e.path.decode("utf-8")
            except UnicodeDecodeError:
                raise Unrepresentable(f"{display(e.path)} is not UTF-8, which b3sum -c cannot check; "
                                      f"nothing was printed (use a sha256 manifest and --format sha256sum)") from None
        name = e.path
        escaped = any(c in name for c in escapes)
        for raw, esc in escapes.items():  # the backslash first, so the escapes stay single
            name = name.replace(raw, esc)
        yield (b"\\" if escaped else b"") + e.digest.encode() + b"  " + name + b"\n"


def json_lines(entries: Iterable[Entry]) -> Iterator[bytes]:
    """One JSON object per entry; a path or target as text with undecodable bytes shown
    as \\xNN, and exactly in base64."""
    for e in entries:
        obj = {"path": path_text(e.path), "path_base64": base64.b64encode(e.path).decode(), "kind": e.kind,
               "mode": f"{e.mode:04o}", "uid": e.uid, "gid": e.gid, "size": e.size, "mtime_ns": e.mtime_ns,
               "xattrs": e.xattrs, "digest": e.digest}
        if e.target is not None:
            obj |= {"target": path_text(e.target), "target_base64": base64.b64encode(e.target).decode()}
        if e.kind in "cb":
            obj["rdev"] = e.rdev
        yield (json.dumps(obj, sort_keys=True) + "\n").encode()
