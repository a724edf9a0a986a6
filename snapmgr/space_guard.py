"""The free-space floor of a volume (min_free), checked before a snapshot is begun.

A group is one consistent set: when one member would be refused, none is taken, for a set
with a member missing is not the set its user restores from (and taking the others would
pause the group's services for a set that cannot be whole)."""

from __future__ import annotations

from snapmgr.backends.base import Backend
from snapmgr.config import Group, Volume
from snapmgr.errors import Interrupted, SnapmgrError, SpaceRefused, as_error


def refusal(volumes: list[Volume], backends: list[Backend], group: Group | None) -> SpaceRefused | None:
    """Why the snapshot of these volumes (taken together when `group` is set) must not
    be taken, or None. An error reading a volume's free space is raised: a floor that
    cannot be checked is not met."""
    refused = []
    for volume, backend in zip(volumes, backends):
        if volume.min_free is None:
            continue
        named = f"volume {volume.name}: " if group else ""   # the CLI names a volume of its own
        try:
            space = backend.free_space()
        except Interrupted:
            raise
        except (SnapmgrError, OSError) as e:
            raise SnapmgrError(f"{named}cannot tell the free space min_free asks for: {as_error(e)}") from None
        if space is None:
            raise SnapmgrError(f"{named}the {backend.name} backend cannot tell its free space, so min_free "
                               f"cannot be checked")
        if why := space.shortfall(volume.min_free):
            refused.append(f"volume {volume.name}: {why}")
    if not refused:
        return None
    if group is None:
        # The CLI and the journal name the volume already.
        return SpaceRefused(f"refusing to snapshot: {refused[0].split(': ', 1)[1]}")
    return SpaceRefused(f"refusing to snapshot group {group.name}, none of its volumes is taken (they are one "
                        f"consistent set): {'; '.join(refused)}")
