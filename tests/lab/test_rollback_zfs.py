"""snapmgr rollback of ZFS volumes on a real pool: the clone of the target swapped in for
each dataset, the dataset it replaces kept beside it (with the pre-rollback snapshot and
any newer ones, still listed and browsable), rolling back to the pre-rollback snapshot
undoing it, newer snapshots refused unless --keep-newer or --destroy-newer says what
becomes of them, recursive volumes, a busy dataset, a rollback cut short and finished,
and a snapshot a kept dataset depends on deleted deferred."""

from __future__ import annotations

import itertools
import os
import subprocess
from pathlib import Path

import pytest

from snapmgr import config
from snapmgr.backends import zfs_rollback
from snapmgr.engine import Engine
from tests.lab.conftest import sh, zfs_volume

_names = itertools.count(1)


@pytest.fixture
def ds(host, pool):
    """A fresh dataset `labpool/rbN` (with a child `c`, which a volume that is not recursive
    does not hold), destroyed with whatever rollbacks left beside it."""
    name = f"{pool}/rb{next(_names)}"
    sh(host, "zfs", "create", name)
    sh(host, "zfs", "create", f"{name}/c")
    Path(f"/{name}/c/passenger").write_text("not the volume's")
    yield name
    for left in reversed(datasets_beside(host, name)):
        if host.run(f"zfs list {left}").rc == 0:
            sh(host, "zfs", "destroy", "-R", "-f", left)


def datasets_beside(host, name: str) -> list[str]:
    parent = name.rpartition("/")[0]
    return [n for n in sh(host, "zfs", "list", "-H", "-o", "name", "-d", "1", parent).split()
            if n == name or n.startswith(name + ".")]


def prop(host, name: str, key: str) -> str:
    return sh(host, "zfs", "get", "-H", "-o", "value", key, name).strip()


def content(root: Path) -> dict[str, str]:
    """The files under root, .zfs and the child datasets' mountpoints aside."""
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*"))
            if p.is_file() and ".zfs" not in p.parts}


def write(root: Path, files: dict[str, str | None]) -> None:
    for name, text in files.items():
        if text is None:
            (root / name).unlink()
        else:
            (root / name).write_text(text)
    subprocess.run(["sync", "-f", root], check=True)


def state(host) -> str:
    """The pool's datasets and the ZFS mounts, for a failure's message."""
    datasets = sh(host, "zfs", "list", "-r", "-o", "name,mountpoint,mounted,canmount,origin", "labpool")
    mounted = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if " zfs " in line]
    return datasets + "\n" + "\n".join(mounted)


def listed(ws) -> dict[str, list[str]]:
    return {s["id"]: s["tags"] for s in ws.ok("--json", "list").json()["snapshots"]}


def browsed(ws, sid: str) -> dict[str, str]:
    engine = Engine(config.load(ws.config))
    backend = engine.backend(engine.config.volumes["data"])
    [snapshot] = [s for s in backend.list() if str(s.id) == sid]
    with backend.browse_root(snapshot) as root:
        return content(root)


def snapshot_then_change(ws, ds: str, first: dict, then: dict) -> str:
    """Volume data of dataset `ds`, holding `first` when snapshotted, then `then`: the snapshot."""
    root = Path(f"/{ds}")
    ws.write_config({"data": zfs_volume(ds)})
    write(root, first)
    ws.ok("snapshot", "data")
    [target] = ws.snapshots()
    write(root, then)
    return target


def test_a_rollback_swaps_a_clone_in_keeps_the_old_dataset_and_is_undone_by_another(host, ws, ds):
    root = Path(f"/{ds}")
    sh(host, "zfs", "set", "compression=lz4", ds)    # a local property, which the clone must have too
    target = snapshot_then_change(ws, ds, {"file": "v1", "gone": "there at first"},
                                  {"file": "v2", "gone": None, "new": "made since"})
    before = content(root)

    plan = ws.ok("--json", "rollback", target, "--dry-run").json()
    assert plan["newer"] == [] and plan["method"].startswith(f"clone {target}, promote the clone")
    assert content(root) == before and datasets_beside(host, ds) == [ds]

    done = ws.ok("--json", "rollback", target, "--yes").json()
    assert content(root) == {"file": "v1", "gone": "there at first", "c/passenger": "not the volume's"}
    # The only difference: the directory the child is mounted on (the snapshot has the
    # parent's directory there, the live volume the child's root).
    changes = ws.ok("--json", "diff", target, "live").json()["changes"]
    assert [c["path"].strip("/") for c in changes] in ([], ["c"]), (changes, state(host))
    safety = done["pre_rollback"]
    kept = f"{ds}.pre-rollback-{safety.split('@')[1]}"
    assert datasets_beside(host, ds) == [ds, kept]
    # The new dataset is mounted where the old one was, with its local properties and
    # the child that is not the volume's; the old one keeps the pre-rollback snapshot,
    # unmounted and out of the way.
    assert host.mount_point(str(root)).exists and prop(host, ds, "canmount") == "on"
    assert prop(host, ds, "compression") == "lz4" and prop(host, ds, "origin") == "-"
    assert prop(host, f"{ds}/c", "mounted") == "yes" and prop(host, kept, "canmount") == "noauto"
    assert prop(host, kept, "mounted") == "no" and prop(host, kept, "origin") == f"{ds}@snapmgr-{target.split('@')[1]}"
    assert sh(host, "zfs", "list", "-H", "-o", "name", "-d", "1", "-t", "filesystem", kept).split() == [kept]
    assert listed(ws) == {target: ["manual"], safety: ["pre-rollback"]}
    assert browsed(ws, safety) == {k: v for k, v in before.items() if not k.startswith("c/")}

    # Rolling back to the pre-rollback snapshot undoes it; the dataset holds the whole line again.
    again = ws.ok("--json", "rollback", safety, "--yes").json()
    assert content(root) == before and again["newer"] == [], state(host)
    assert prop(host, ds, "origin") == "-" and len(listed(ws)) == 3


def test_newer_snapshots_are_refused_unless_kept_or_destroyed_as_asked(host, ws, ds):
    root = Path(f"/{ds}")
    ws.write_config({"data": zfs_volume(ds)})
    ids = []
    for text in ("one", "two", "three"):
        write(root, {"file": text})
        ws.ok("snapshot", "data")
        ids = ws.snapshots()
    first, second, third = ids
    write(root, {"file": "four"})

    refused = ws.run("rollback", first, "--yes")
    assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1
    assert f"{second}, {third} would leave {ds}" in refused.stderr
    assert "--keep-newer" in refused.stderr and "--destroy-newer" in refused.stderr
    assert content(root)["file"] == "four" and ws.snapshots() == ids and datasets_beside(host, ds) == [ds]

    plan = ws.ok("--json", "rollback", second, "--destroy-newer", "--dry-run").json()
    assert plan["newer"] == [{"snapshot": third, "fate": "destroyed"}]
    done = ws.ok("--json", "rollback", second, "--destroy-newer", "--yes").json()
    assert content(root)["file"] == "two"
    assert listed(ws) == {first: ["manual"], second: ["manual"], done["pre_rollback"]: ["pre-rollback"]}
    assert not [n for n in sh(host, "zfs", "list", "-H", "-o", "name", "-t", "snapshot", "-r", "labpool").split()
                if n.endswith(third.split("@")[1])]

    # --keep-newer: every snapshot stays listed and browsable, the newer ones on the kept dataset.
    # The pre-rollback snapshot is on the dataset that rollback kept, and stays there.
    plan = ws.ok("--json", "rollback", first, "--keep-newer", "--dry-run").json()
    assert [n["snapshot"] for n in plan["newer"]] == [second, done["pre_rollback"]]
    assert plan["newer"][0]["fate"].startswith(f"moves to {ds}.pre-rollback-") and plan["newer"][1]["fate"] == "kept"
    kept = ws.ok("--json", "rollback", first, "--keep-newer", "--yes").json()
    assert content(root)["file"] == "one"
    assert set(listed(ws)) == {first, second, done["pre_rollback"], kept["pre_rollback"]}
    assert browsed(ws, second)["file"] == "two" and browsed(ws, kept["pre_rollback"])["file"] == "two"
    assert ws.ok("verify", second).returncode == 0


def test_a_snapshot_a_kept_dataset_depends_on_is_deleted_deferred(host, ws, ds):
    root = Path(f"/{ds}")
    target = snapshot_then_change(ws, ds, {"file": "one"}, {"file": "two"})
    safety = ws.ok("--json", "rollback", target, "--yes").json()["pre_rollback"]
    kept = f"{ds}.pre-rollback-{safety.split('@')[1]}"
    snap = f"{ds}@snapmgr-{target.split('@')[1]}"

    ws.ok("delete", target)      # the origin of the kept dataset: ZFS destroys it with that
    assert set(listed(ws)) == {safety}
    assert prop(host, snap, "defer_destroy") == "on"
    sh(host, "zfs", "destroy", "-r", kept)
    assert host.run(f"zfs list {snap}").rc != 0


def test_a_recursive_volume_rolls_back_every_dataset(host, ws, ds):
    root = Path(f"/{ds}")
    sh(host, "zfs", "create", "-o", "canmount=off", f"{ds}/hidden")   # there for its properties only
    sh(host, "zfs", "set", "compression=lz4", f"{ds}/c")
    ws.write_config({"data": zfs_volume(ds, recursive=True)})
    write(root, {"top": "t1", "c/passenger": "c1"})
    ws.ok("snapshot", "data")
    [target] = ws.snapshots()
    write(root, {"top": "t2", "c/passenger": "c2", "c/new": "made since"})
    before = content(root)
    # A dataset made since the snapshot would leave with the replaced ones: refused, named.
    sh(host, "zfs", "create", f"{ds}/later")
    refused = ws.run("rollback", target, "--yes")
    assert refused.returncode == 1 and f"{ds}/later were made since {target}" in refused.stderr
    sh(host, "zfs", "destroy", f"{ds}/later")

    done = ws.ok("--json", "rollback", target, "--yes").json()
    assert content(root) == {"top": "t1", "c/passenger": "c1"}
    kept = f"{ds}.pre-rollback-{done['pre_rollback'].split('@')[1]}"
    assert prop(host, f"{ds}/c", "mountpoint") == f"/{ds}/c" and prop(host, f"{ds}/c", "mounted") == "yes"
    assert prop(host, f"{ds}/c", "compression") == "lz4" and prop(host, f"{ds}/c", "origin") == "-"
    assert prop(host, f"{ds}/hidden", "canmount") == "off" and prop(host, f"{ds}/hidden", "mounted") == "no"
    assert {prop(host, n, "canmount") for n in (kept, f"{kept}/c", f"{kept}/hidden")} == {"noauto"}
    assert {prop(host, n, "mounted") for n in (kept, f"{kept}/c")} == {"no"}
    assert browsed(ws, done["pre_rollback"]) == before

    ws.ok("rollback", done["pre_rollback"], "--yes")
    assert content(root) == before and prop(host, f"{ds}/c", "mounted") == "yes", state(host)


def test_a_busy_dataset_is_named_with_who_holds_it_and_left_as_it_was(host, ws, ds):
    root = Path(f"/{ds}")
    target = snapshot_then_change(ws, ds, {"file": "one"}, {"file": "two"})
    holder = subprocess.Popen(["sleep", "600"], cwd=root / "c")
    try:
        r = ws.run("rollback", target, "--yes")
    finally:
        holder.kill()
        holder.wait()
    error = r.stderr.splitlines()[-1]     # after the plan, which is shown whenever the question would be asked
    assert r.returncode == 1 and f"{ds}/c cannot be unmounted from '{root}/c': it is used by 'sleep' (pid {holder.pid})" \
        in error
    assert content(root)["file"] == "two" and prop(host, f"{ds}/c", "mounted") == "yes"
    assert datasets_beside(host, ds) == [ds]
    ws.ok("rollback", target, "--yes", "--keep-newer")
    assert content(root)["file"] == "one"


@pytest.mark.parametrize("cut", ["after the promote", "between the renames"])
def test_a_rollback_cut_short_is_finished_by_resuming(host, ws, ds, cut):
    root = Path(f"/{ds}")
    ws.write_config({"data": zfs_volume(ds)})
    write(root, {"file": "one"})
    ws.ok("snapshot", "data")
    write(root, {"file": "two"})
    engine = Engine(config.load(ws.config))
    volume = engine.config.volumes["data"]
    backend = engine.backend(volume)
    [target] = backend.list()
    way = backend.rollback_way(target, [target], None)
    safety = engine.pre_rollback(volume)
    # What the run left in the journal when it was killed: its rollback under way.
    journal = engine.journal
    record = journal.rollback_begun(journal.begin("data", "rollback", os.getpid()), "data", str(target.id),
                                    way.method, None)
    journal.rollback_moved(record, "rolling-back", pre_rollback=safety)

    # What a kill -9 leaves: the clone built and promoted (it holds the target now), and
    # maybe the old dataset renamed away, with nothing under the volume's name.
    swap = zfs_rollback.Swap.of(ds, target.meta["snapshots"], f"snapmgr-{target.id.label}",
                                safety.split("@")[1], False)
    zfs_rollback._unmount([ds])
    zfs_rollback._build(swap)
    if cut == "between the renames":
        zfs_rollback._rename(swap.live, swap.kept)
        assert host.run(f"zfs list {ds}").rc != 0
    assert {str(s.id) for s in backend.list()} == {str(target.id), safety}   # listed all the while

    assert "snapmgr rollback --resume data" in ws.ok("list").stderr   # the next run tells of it
    ws.ok("rollback", "--resume", "data", "--yes")
    assert content(root) == {"file": "one", "c/passenger": "not the volume's"}
    assert ws.ok("--json", "status").json()["volumes"][0]["rollback"] is None
    assert datasets_beside(host, ds) == [ds, swap.kept] and prop(host, ds, "canmount") == "on"
    assert prop(host, ds, "snapmgr:canmount") == "-" and prop(host, swap.kept, "canmount") == "noauto"
