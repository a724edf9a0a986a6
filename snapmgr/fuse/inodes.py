"""Stable FUSE inode numbers, without a table of every file seen.

A file inside a snapshot gets (the snapshot's slot << SLOT_SHIFT) | its own inode number,
so the number is the same every time the kernel looks the file up, a hardlinked pair
shows one number, and an LVM snapshot mounted again after an idle release keeps its
numbers. The snapshot's root directory is inner number 0, known before the snapshot is
entered. Another filesystem mounted inside a snapshot's tree (a ZFS volume's child
dataset) numbers its files by itself, so its files get a slot of their own, named by
where it is mounted in the tree. Slot 0 holds the virtual top levels (from 1, the FUSE
root) and, above OVERFLOW_BASE, the few files whose own inode number does not fit in
SLOT_SHIFT bits: only those are remembered in a table, for the life of the mount."""

from __future__ import annotations

from typing import Hashable

SLOT_SHIFT = 40
INNER_MASK = (1 << SLOT_SHIFT) - 1
OVERFLOW_BASE = 1 << 32
MAX_SLOT = (1 << (64 - SLOT_SHIFT)) - 1
ROOT = 1  # pyfuse3.ROOT_INODE


class Inodes:
    def __init__(self):
        self._virtual: dict[tuple, int] = {("root",): ROOT}
        self._keys: dict[int, tuple] = {ROOT: ("root",)}
        self._overflow: dict[tuple[int, int], int] = {}
        self._overflow_slots: dict[int, int] = {}
        self._slots: dict[Hashable, int] = {}
        self._owners: dict[int, int] = {}   # the slot of a filesystem inside a snapshot -> the snapshot's

    def slot(self, snapshot: Hashable) -> int:
        """The snapshot's slot, the same for the life of the mount."""
        return self._slots.setdefault(snapshot, len(self._slots) + 1)

    def inner_slot(self, slot: int, place: bytes) -> int:
        """The slot of the files of the filesystem mounted at `place` in snapshot `slot`."""
        inner = self._slots.setdefault((slot, place), len(self._slots) + 1)
        self._owners[inner] = slot
        return inner

    def virtual(self, key: tuple) -> int:
        """The inode of a virtual node, named by a tuple such as ("volume", "data")."""
        ino = self._virtual.get(key)
        if ino is None:
            ino = self._virtual[key] = ROOT + len(self._virtual)
            if ino >= OVERFLOW_BASE:
                raise OverflowError("too many virtual nodes")
            self._keys[ino] = key
        return ino

    def key_of(self, ino: int) -> tuple | None:
        """The key of a virtual node's inode; None for anything else."""
        return self._keys.get(ino)

    @staticmethod
    def snapshot_root(slot: int) -> int:
        if not 0 < slot <= MAX_SLOT:
            raise OverflowError(f"snapshot slot {slot} out of range")
        return slot << SLOT_SHIFT

    def of_file(self, slot: int, st_ino: int, root_ino: int | None) -> int:
        """The FUSE inode of the file whose own inode is `st_ino` in `slot`, whose root
        directory (if it is a snapshot's) has the inode `root_ino`."""
        if st_ino == root_ino:
            return self.snapshot_root(slot)
        if 0 < st_ino <= INNER_MASK:
            return self.snapshot_root(slot) | st_ino
        ino = self._overflow.get((slot, st_ino))
        if ino is None:
            ino = self._overflow[(slot, st_ino)] = OVERFLOW_BASE + len(self._overflow)
            if ino >= 1 << SLOT_SHIFT:
                raise OverflowError("too many files with huge inode numbers")
            self._overflow_slots[ino] = slot
        return ino

    def slot_of(self, ino: int) -> int | None:
        """The snapshot slot a file inode belongs to; None for a virtual node."""
        slot = ino >> SLOT_SHIFT or self._overflow_slots.get(ino)
        return self._owners.get(slot, slot)

    @staticmethod
    def is_snapshot_root(ino: int) -> bool:
        return ino >> SLOT_SHIFT != 0 and ino & INNER_MASK == 0
