"""rsync hardlink snapshots: each snapshot is a full tree whose unchanged files are
hardlinks into the previous one (`--link-dest`), as rsnapshot makes them."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shlex
import shutil
from collections import Counter
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from dataclasses import replace
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from snapmgr import schema, sh
from snapmgr.backends import changes, linked_trees, mounts, rsync_filters
from snapmgr.backends.base import Progress, RollbackWay, Space
from snapmgr.backends.directory import DirectoryBackend, syncfs
from snapmgr.errors import RollbackRefused, SnapmgrError, SpaceRefused, UsageError, quote
from snapmgr.model import Snapshot, SnapshotId, human_size
from snapmgr.restore import argv as restore_argv, copy, kept_out
from snapmgr.volume_paths import children, shown

log = logging.getLogger(__name__)

PARTIAL = ".partial"
DELETING = ".deleting"
NAMES = ".names"  # the names the pass in the window copies, while it runs
RSYNC_PARTIAL = 23   # "some files/attrs were not transferred"
RSYNC_VANISHED = 24  # "some files vanished before they could be transferred": normal on a live system
ENOSPC_TEXT = os.strerror(errno.ENOSPC)   # "No space left on device", as rsync reports a full filesystem
# A file deleted between rsync's listing and its reading of the file's ACLs or xattrs is
# reported as a partial transfer (23), not as vanished; these lines say it was that.
_VANISHED_ATTR_RE = re.compile(r"^rsync: \[sender\] (get_acl|get_xattr|[a-z_]+xattr)\b.*No such file or directory \(2\)$")
_STAT_RE = re.compile(r"^(Number of [a-z ]+|Total [a-z ]+size): ([\d,]+)", re.M)
# rsync's own limit on a path below the source (MAXPATHLEN); it names the directory.
_TOO_LONG_RE = re.compile(r"^filename overflows max-path len by \d+: (.+)/[^/\n]*$", re.M)


class RsyncBackend(DirectoryBackend):
    name = "rsync"
    atomic = False   # a copy made file by file, while the source may change
    shares_inodes = True   # --link-dest: an unchanged file is a hardlink to the previous one
    options = {
        "source": schema.Field(schema.existing_dir, required=True),
        "repository": schema.Field(schema.path(), required=True),
        "exclude": schema.Field(schema.list_of(schema.string), default=()),
        "one_file_system": schema.Field(schema.boolean, default=False),
        "checksum": schema.Field(schema.boolean, default=False),
    }

    @classmethod
    def check_options(cls, options: Mapping) -> None:
        source = Path(os.path.realpath(options["source"]))
        repository = Path(os.path.realpath(options["repository"]))
        if repository == source:
            raise schema.InvalidKey("repository", f"{quote(repository)} is the source itself")
        if not repository.is_relative_to(source):
            return
        inside = PurePosixPath(repository.relative_to(source))
        if not rsync_filters.surely_excluded(options["exclude"], inside):
            raise schema.InvalidKey(
                "repository", f"{quote(repository)} is inside the source {quote(source)}, so every snapshot would "
                              f"copy all earlier ones into itself; exclude it ({_exclude_advice(inside)}) or move "
                              f"it out of the source")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Each prebuilt snapshot's mark (None when the pass in the window compares the whole
        # tree), and the bytes its prepass copied.
        self._prebuilt: dict[SnapshotId, tuple[changes.Mark | None, int]] = {}

    @property
    def snapshot_dir(self) -> Path:
        return self.opts["repository"]

    def _is_snapshot(self, path: Path) -> bool:
        return True

    def live_root(self) -> Path | None:
        return self.opts["source"]

    def left_out(self) -> tuple[str, ...]:
        return tuple(self.opts["exclude"])

    def crosses_mounts(self) -> bool:
        return not self.opts["one_file_system"]

    def plan_create(self, snapshot_id: SnapshotId) -> str:
        argv = self._argv(self._partial(snapshot_id), self._latest(), progress=False)
        return f"{shlex.join(argv)}, then rename to {snapshot_id}"

    def _prebuild(self, snapshot_id: SnapshotId, progress: Progress | None) -> None:
        partial, latest = self._partial(snapshot_id), self._latest()
        self._take_over_partials(partial, seeding=latest is None)
        mark = self._mark(snapshot_id)
        # Files changing meanwhile are expected: the pass in the window copies them again.
        result = self._rsync(partial, latest, progress, accept=(0, RSYNC_VANISHED, RSYNC_PARTIAL))
        syncfs(partial)
        if mark and result.returncode == RSYNC_PARTIAL:
            log.debug("%s: the prepass left files out (rsync exit 23); the pass in the window compares the "
                      "whole tree", snapshot_id)
            mark = None
        self._prebuilt[snapshot_id] = mark, _copied(result)

    def _build(self, snapshot_id: SnapshotId, progress: Progress | None) -> dict:
        """The copy, or after _prebuild the short pass that brings it up to date."""
        partial, latest = self._partial(snapshot_id), self._latest()
        prepass_copied = 0
        if snapshot_id in self._prebuilt:
            mark, prepass_copied = self._prebuilt.pop(snapshot_id)
            results = self._update(snapshot_id, partial, latest, progress, mark)
        else:
            self._take_over_partials(partial, seeding=latest is None)
            results = [self._rsync(partial, latest, progress)]
        syncfs(partial)
        # copied_bytes: what this snapshot holds that no earlier one shares (the files
        # rsync copied rather than hardlinked), over its prepass and its pass in the window.
        # source_filesystem: which filesystem the source was (statvfs f_fsid), so that a
        # rollback can tell it from whatever lies underneath when it is not mounted.
        meta = {"source": str(self.opts["source"]), "source_filesystem": os.statvfs(self.opts["source"]).f_fsid,
                "link_dest": latest.name if latest else None,
                "rsync_stats": _summed(_parse_stats(r.stdout) for r in results),
                "copied_bytes": prepass_copied + sum(map(_copied, results))}
        if failed := [r.returncode for r in results if r.returncode]:
            log.warning("%s: some files vanished while rsync copied them", snapshot_id)
            meta["warnings"] = [f"some files vanished during the copy (rsync exit {failed[0]})"]
        return meta

    def _mark(self, snapshot_id: SnapshotId) -> changes.Mark | None:
        """What the pass in the window needs to copy only what changes from now on."""
        if self.opts["checksum"]:
            log.debug("%s: checksum = true, so the pass in the window compares every file", snapshot_id)
            return None
        try:
            return changes.take_mark(self._scope())
        except changes.WholeTree as why:
            log.debug("%s: the pass in the window compares the whole tree: %s", snapshot_id, why)
            return None

    def _update(self, snapshot_id: SnapshotId, partial: Path, latest: Path | None, progress: Progress | None,
                mark: changes.Mark | None) -> list[sh.Completed]:
        """The pass in the window: over what changed since the mark, else the whole tree."""
        try:
            passes = mark and changes.prepare(mark, self._scope(), partial)
        except changes.WholeTree as why:
            log.debug("%s: the pass in the window compares the whole tree: %s", snapshot_id, why)
            passes = None
        if not passes:
            return [self._rsync(partial, latest, progress)]
        log.debug("%s: the pass in the window lists %d names and copies %d directories whole", snapshot_id,
                  len(passes.names), len(passes.trees))
        return [self._rsync_listed(partial, latest, progress, names, recursive)
                for names, recursive in ((passes.names, False), (passes.trees, True)) if names]

    def _rsync_listed(self, partial: Path, latest: Path | None, progress: Progress | None, names: Sequence[str],
                      recursive: bool) -> sh.Completed:
        # --delete-missing-args: a name gone since it was listed is deleted from the copy,
        # as a pass over the whole tree would. -a does not recurse through a list by
        # itself. --link-dest stays: it costs per listed name only, and links what is as
        # the previous snapshot has it (an entry unshared, changed back, or in a directory
        # copied whole), as one pass would.
        with _listed(partial.with_suffix(NAMES), map(os.fsencode, names)) as path:
            listing = [f"--files-from={path}", "--from0", "--delete-missing-args", *(["-r"] if recursive else [])]
            return self._rsync(partial, latest, progress, listing)

    def _rsync(self, partial: Path, latest: Path | None, progress: Progress | None, listing: Sequence[str] = (),
               accept: tuple[int, ...] = (0, RSYNC_VANISHED)) -> sh.Completed:
        """One rsync run into `partial`. With min_free, the repository's filesystem is
        watched meanwhile: at the floor rsync is killed and the partial copy removed, so
        that neither a full filesystem nor half a snapshot is left behind."""
        argv = self._argv(partial, latest, progress is not None, listing)
        short = self._space_watch(partial)
        try:
            result = sh.run(argv, check=False, on_stdout=progress and _progress_lines_only(progress),
                            stop_when=short)
        except SpaceRefused:
            self._discard(partial)
            raise
        if not _accepted(result, accept):
            # A burst of writes can fill the filesystem between two looks: rsync then
            # fails with ENOSPC (and removes the file it was writing), and that is the floor too.
            if short and (refused := short(filled=ENOSPC_TEXT in result.stderr)):
                self._discard(partial)
                raise refused from None
            raise _failure(result)
        return result

    def _space_watch(self, partial: Path) -> Callable[..., SpaceRefused | None] | None:
        """What tells, cheaply enough to ask ten times a second, that the repository's
        filesystem is below min_free (or, `filled`, that it was full); None without a floor."""
        if self.min_free is None:
            return None
        where = self._filesystem_space().where

        def short(filled: bool = False) -> SpaceRefused | None:
            space = self._filesystem_space(where)
            why = space.shortfall(self.min_free) or (filled and f"{where} filled up (rsync: {ENOSPC_TEXT}; "
                                                                f"now {human_size(space.free)} free, min_free "
                                                                f"{self.min_free.text})")
            return SpaceRefused(f"stopped copying into {partial.name} and removed it: {why}") if why else None
        return short

    def free_space(self) -> Space:
        return self._filesystem_space()

    def space(self, snapshots: list[Snapshot]) -> Space:
        """The repository's filesystem; what each snapshot holds is what it copied when it
        was taken (the rest are hardlinks to earlier snapshots), as its metadata recorded."""
        held_each = {s.id: copied for s in snapshots if (copied := _recorded_copy(s.meta)) is not None}
        return replace(self._filesystem_space(), held=sum(held_each.values()), held_each=held_each,
                       note="held: what each snapshot copied when taken; a file it shared with a pruned "
                            "snapshot is counted in none")

    def rollback_way(self, target: Snapshot, snapshots: list[Snapshot], choice: str | None,
                     resuming: bool = False) -> RollbackWay:
        live = self.live_root()
        recorded = target.meta.get("source_filesystem")
        if recorded is not None and recorded != os.statvfs(live).f_fsid:
            raise SnapmgrError(f"{quote(live)} is not on the filesystem {target.id} was taken from (is it mounted?): a "
                               f"rollback would fill whatever lies underneath; nothing was changed")
        return RollbackWay("rsync --delete from the snapshot into the source, over only the names where the "
                           "pre-rollback snapshot and it differ (and each name of a file it links under several) "
                           "when that can be told; what the snapshots leave out is kept as it is")

    def roll_back(self, target: Snapshot, way: RollbackWay, keep: Sequence[tuple[Path, str]], resuming: bool,
                  current: Snapshot | None = None) -> None:
        # A copy cut short is finished by copying again: rsync skips what already matches.
        live = self.live_root()
        try:
            kept = kept_out(live, [b""], keep)
        except UsageError as e:
            raise RollbackRefused(f"{e}; nothing was changed") from None
        left_out = rsync_filters.matcher([*kept, *self.left_out()])
        with self.browse_root(target) as root:
            found = self._apart(target, root, current, left_out)
            for path in found.filed if found else ():
                if held := _held_below(live, path, left_out):
                    raise RollbackRefused(f"{shown(path)} is a directory holding {shown(held)}, which the rollback "
                                          f"keeps (the snapshots leave it out), where {target.id} has no directory: "
                                          f"move it out of the way first; nothing was changed")
            if found is None or len(found.names) > changes.WHOLE_TREE_SHARE * found.entries:
                if found is not None:
                    log.debug("the copy compares the whole tree: %d of its %d entries would be listed",
                              len(found.names), found.entries)
                copy(root, [b""], live, delete=True, left_out=self.left_out(), kept=kept, own_mounts=self.own_mounts())
                return
            log.debug("%s: the copy lists the %d names where the volume differs or that name a linked file",
                      target.id, len(found.names))
            with _listed(self.snapshot_dir / f"{target.id}{NAMES}", found.names) as path:
                sh.run(restore_argv(root, [], live, False, True, self.left_out(), kept, names_from=path))

    def _apart(self, target: Snapshot, root: Path, current: Snapshot | None,
               left_out: Callable[[bytes, bool], bool]) -> linked_trees.Apart | None:
        """Where the volume, as the pre-rollback snapshot `current` holds it, and `target`
        (at `root`) are apart (linked_trees), but what the copy leaves out; None when that
        cannot be told."""
        live = Path(os.path.realpath(self.live_root()))
        if current is None or current.meta.get("warnings"):
            why = "no pre-rollback snapshot holds the volume exactly as it is"   # a file vanished while copied
        elif any(m.mountpoint != live for m in mounts.below(live)):
            why = "other filesystems are mounted in the volume"   # which a copy goes around
        elif (found := linked_trees.apart(root, current.path, left_out)) is None:
            why = f"{current.id} is on another filesystem than {target.id}"
        else:
            return found
        log.debug("the copy compares the whole tree: %s", why)
        return None

    def _publish(self, snapshot_id: SnapshotId) -> None:
        self._partial(snapshot_id).rename(self.snapshot_dir / str(snapshot_id))

    def _discard(self, path: Path) -> None:
        # Renamed first, so a delete cut short leaves nothing that looks like a snapshot.
        if not os.path.lexists(path):
            return   # a copy stopped before rsync made its directory
        doomed = path.with_name(path.name + DELETING)
        path.rename(doomed)
        shutil.rmtree(doomed)

    def _clean_leftovers(self) -> None:
        for doomed in self._suffixed(DELETING):
            log.info("finishing an interrupted delete: %s", doomed.name)
            shutil.rmtree(doomed)
        for names in self._suffixed(NAMES):
            names.unlink()

    # -------------------------------------------------------------------------------

    def _partial(self, snapshot_id: SnapshotId) -> Path:
        return self.snapshot_dir / f"{snapshot_id}{PARTIAL}"

    def _latest(self) -> Path | None:
        return max(self._snapshot_dirs(), default=(None, None))[1]

    def _scope(self) -> changes.Scope:
        return changes.Scope(self.opts["source"], self.opts["one_file_system"], self.snapshot_dir)

    def _argv(self, partial: Path, latest: Path | None, progress: bool,
              listing: Sequence[str] = ()) -> list[str]:
        # --delete-excluded: a reused interrupted copy must end up as a fresh one would, also
        # when the excludes changed since it was made. --modify-window=-1: mtimes compared
        # to the nanosecond, so the pass after a prepass misses no file changed within the
        # same second. --open-noatime: reading a frozen source must not try to write atimes.
        argv = ["rsync", "-aHAX", "--numeric-ids", "--delete", "--delete-excluded", "--sparse", "--stats",
                "--modify-window=-1", "--open-noatime"]
        if progress:
            argv.append("--info=progress2")
        if self.opts["one_file_system"]:
            argv.append("--one-file-system")
        if self.opts["checksum"]:
            argv.append("--checksum")
        argv += [f"--exclude={pattern}" for pattern in self.opts["exclude"]]
        if latest:
            argv.append(f"--link-dest={latest}")
        return argv + [*listing, f"{self.opts['source']}/", f"{partial}/"]

    def _take_over_partials(self, partial: Path, seeding: bool) -> None:
        """A `.partial` left by a crash is reused only for the first, seeding copy, where
        it saves the most; later copies start clean, because files rsync finds already in
        place would not be hardlinked to the previous snapshot and would waste space."""
        leftovers = self._suffixed(PARTIAL)
        if seeding and leftovers:
            log.info("reusing the interrupted first copy %s", leftovers[-1].name)
            leftovers.pop().rename(partial)
        for leftover in leftovers:
            log.info("removing an interrupted copy: %s", leftover.name)
            shutil.rmtree(leftover)


def _held_below(root: Path, path: bytes, left_out: Callable[[bytes, bool], bool]) -> bytes | None:
    """Something `left_out` says, in the directory `path` below `root` or deeper: what a
    copy that puts a file there could not delete."""
    todo = [path]
    while todo:
        for inside, is_dir in children(root, todo.pop()) or ():
            if left_out(inside, is_dir):
                return inside
            if is_dir:
                todo.append(inside)
    return None


@contextmanager
def _listed(path: Path, names: Iterable[bytes]) -> Iterator[Path]:
    """A file at `path` listing `names` for rsync --files-from --from0, while in use. It
    is written into the repository: that is never frozen, and rsync refuses a list
    behind a symlink (/dev/fd/N)."""
    path.write_bytes(b"".join((name or b".") + b"\0" for name in names))
    try:
        yield path
    finally:
        path.unlink()


def _failure(result: sh.Completed) -> SnapmgrError:
    """rsync's failure as an error. A path too long for rsync fails every snapshot until
    it is excluded, so that error says how."""
    if m := _TOO_LONG_RE.search(result.stderr):
        return SnapmgrError(f"a path in the source is longer than rsync can copy (4096 bytes); exclude its "
                            f"directory ({_exclude_advice(PurePosixPath(m[1]))}) or shorten it")
    return sh.CommandError(result.argv, result.returncode, result.stderr)


def _accepted(result: sh.Completed, accept: tuple[int, ...]) -> bool:
    """Whether the run did what its caller can go on with. A partial transfer (23) is
    never that when a file could not be created or written for lack of space (or of
    inodes): the copy is short, and the next pass would only fail the same way."""
    if result.returncode == RSYNC_PARTIAL and ENOSPC_TEXT in result.stderr:
        return False
    return result.returncode in accept or _vanished_only(result)


def _vanished_only(result: sh.Completed) -> bool:
    """A partial transfer whose every error is a file that vanished while being read."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("rsync: ")]
    return result.returncode == RSYNC_PARTIAL and bool(errors) and all(map(_VANISHED_ATTR_RE.match, errors))


def _exclude_advice(inside: PurePosixPath) -> str:
    """The config line that leaves `inside` (relative to the source) out, as TOML."""
    return f"exclude = [{json.dumps(rsync_filters.anchored(inside), ensure_ascii=False)}]"


def _progress_lines_only(progress: Progress) -> Progress:
    """--info=progress2 lines carry a percentage; the --stats report that follows does not."""
    return lambda line: progress(line) if "%" in line else None


def _summed(stats: Iterable[dict[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for one in stats:
        total.update(one)
    return dict(total)


def _copied(result: sh.Completed) -> int:
    """The bytes of the files a run copied (its apparent sizes: a sparse file's holes count)."""
    return _parse_stats(result.stdout).get("total_transferred_file_size", 0)


def _recorded_copy(meta: dict) -> int | None:
    """The bytes a snapshot copied when taken, from its metadata; a snapshot made before
    copied_bytes was recorded has rsync's figure of its last pass, exact unless a prepass
    copied most of it beforehand."""
    copied = meta.get("copied_bytes")
    if copied is None:
        copied = (meta.get("rsync_stats") or {}).get("total_transferred_file_size")
    return copied if isinstance(copied, int) else None


def _parse_stats(stdout: str) -> dict[str, int]:
    return {key.lower().replace(" ", "_"): int(value.replace(",", ""))
            for key, value in _STAT_RE.findall(stdout)}

