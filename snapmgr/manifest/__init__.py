"""Per-snapshot manifests: every entry's metadata and every regular file's content hash,
recorded when a snapshot is taken and checked by `verify`.

entry: what is recorded and how two states compare; walk: a tree into entries;
hashing: content hashes in parallel; xattrs: one digest of an entry's xattrs; longpath:
paths deeper than PATH_MAX; fileformat: the file; store: where it lives; verify: a
snapshot against its manifest; export: the formats of b3sum and sha256sum."""

from snapmgr.manifest.entry import Change, Entry, compare, display, path_text, walk_key
from snapmgr.manifest.fileformat import ManifestDamaged
from snapmgr.manifest.hashing import ALGORITHMS, hash_file
from snapmgr.manifest.walk import ScanError, ScanStats, scan, settled_before, stream
from snapmgr.manifest.store import Manifest, delete, load, manifest_path, save

__all__ = ["ALGORITHMS", "Change", "Entry", "Manifest", "ManifestDamaged", "ScanError", "ScanStats", "compare",
           "delete", "display", "path_text", "hash_file", "load", "manifest_path", "save", "scan", "settled_before",
           "stream", "walk_key"]
