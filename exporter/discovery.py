"""Organization discovery (SPEC §11): one org set per organization the organizations collector lists."""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable

from exporter.config import Config, OrgSet

log = logging.getLogger(__name__)


def discovered_sets(config: Config, organizations: Iterable[tuple[str, str]]) -> tuple[OrgSet, ...]:
    """The org sets discovery makes of (org_id, name) pairs under `config` (its configured sets only).

    A set is named by its organization; a name that a configured set has, or that two
    organizations share, gets ` (<org_id>)` appended, for every organization of that name, so
    a name never means two things and never moves from one organization to another by accident.
    """
    excluded = set(config.discovery.exclude)
    orgs = sorted({(org_id, (name.strip() or org_id)) for org_id, name in organizations if org_id not in excluded})
    # Every configured set, not only this shard's: a name must mean the same on every replica.
    configured = {s.name for s in (config.all_org_sets if config.shard is not None else config.org_sets)}
    uses = collections.Counter(name for _, name in orgs)
    sets: list[OrgSet] = []
    taken = set(configured)
    for org_id, name in orgs:
        if name in configured or uses[name] > 1:
            name = f"{name} ({org_id})"
        if name in taken:
            log.warning("discovered organization skipped: its set name is taken", extra={"org_id": org_id,
                                                                                       "org_set": name})
            continue
        taken.add(name)
        sets.append(config.discovered_org_set(name, org_id))
    return tuple(sets)
