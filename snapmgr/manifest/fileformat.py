"""The manifest file: gzip'd JSON lines, stdlib only, so any tool can read it.

    {"manifest": 1, "algorithm": "blake3", "snapshot": "data@20261121T140501Z"}
    [["", "d", 493, 0, 0, 4096, 1732197901000000000, 256, ..., null, null, null], ...]
    ...
    {"end": 2}

The first line says what follows; each line after it holds up to CHUNK entries, each an
array in Entry's field order (a line per entry cost a JSON call per entry, half of what
reading and writing a manifest took); the last line counts the entries, so a file cut
short is told from a complete one. A path is bytes
and JSON holds text: each path (and symlink target) is decoded as UTF-8 with
surrogateescape, which maps every byte that is not UTF-8 to a lone surrogate that JSON
escapes as \\udcXX, and so round-trips any name exactly."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import IO, Iterable, Iterator

from snapmgr.errors import SnapmgrError, quote
from snapmgr.manifest.entry import Entry

VERSION = 1
CHUNK = 4096
# Fast compression: a manifest is written with every snapshot, and level 1 already gets
# most of what gzip can get from JSON lines of similar paths.
LEVEL = 1
# ASCII out (a lone surrogate becomes \udcXX), so a line decodes as UTF-8 whatever the names.
_dumps = json.JSONEncoder(separators=(",", ":")).encode
_loads = json.JSONDecoder().decode


class ManifestDamaged(SnapmgrError):
    pass


def encode_name(name: bytes) -> str:
    return name.decode("utf-8", "surrogateescape")


def decode_name(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def write(path: Path, header: dict, entries: Iterable[Entry]) -> int:
    """Write the manifest whole or not at all (a temporary file, synced, renamed, its
    directory synced); the number of entries written."""
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    try:
        with open(tmp, "wb") as raw:
            with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=LEVEL, mtime=0) as z:
                z.write(_line({"manifest": VERSION, **header}))
                rows = []
                for e in entries:
                    rows.append([encode_name(e.path), e.kind, e.mode, e.uid, e.gid, e.size, e.mtime_ns, e.ino,
                                 e.ctime_ns, e.nlink, e.rdev, None if e.target is None else encode_name(e.target),
                                 e.xattrs, e.digest])
                    if len(rows) == CHUNK:
                        z.write((_dumps(rows) + "\n").encode())
                        count, rows = count + len(rows), []
                if rows:
                    z.write((_dumps(rows) + "\n").encode())
                    count += len(rows)
                z.write(_line({"end": count}))
            raw.flush()
            os.fsync(raw.fileno())
        tmp.rename(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # The rename itself survives a power cut only once the directory is synced.
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return count


def _line(obj: dict) -> bytes:
    return (_dumps(obj) + "\n").encode()


def read_header(f: IO[bytes], path: Path) -> dict:
    header = _parse(f.readline(), path, 1)
    if not isinstance(header, dict) or header.get("manifest") != VERSION:
        raise ManifestDamaged(f"manifest {quote(path)} is not a snapmgr manifest of version {VERSION}")
    return header


def read_entries(f: IO[bytes], path: Path) -> Iterator[Entry]:
    """The entries after the header, checked against the closing count."""
    count = 0
    for number, line in enumerate(f, start=2):
        rows = _parse(line, path, number)
        if isinstance(rows, dict):
            if rows.get("end") != count:
                raise ManifestDamaged(f"manifest {quote(path)} ends after {count} entries but says {rows.get('end')}")
            return
        try:
            for row in rows:
                row[0] = decode_name(row[0])
                if row[11] is not None:
                    row[11] = decode_name(row[11])
                yield Entry._make(row)
        except (TypeError, IndexError, AttributeError, UnicodeError):
            raise ManifestDamaged(f"manifest {quote(path)}, line {number}: not a list of entries") from None
        count += len(rows)
    raise ManifestDamaged(f"manifest {quote(path)} is cut short after {count} entries")


def _parse(line: bytes, path: Path, number: int):
    try:
        return _loads(line.decode())
    except ValueError:  # UnicodeDecodeError too
        raise ManifestDamaged(f"manifest {quote(path)}, line {number}: not JSON") from None


def opened(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb")
