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
    settings = config.discovery
    excluded = set(settings.exclude)
    orgs = sorted({(org_id, (name.strip() or org_id)) for org_id, name in organizations if org_id not in excluded})
    configured = {s.name for s in config.org_sets}
    uses = collections.Counter(name for _, name in orgs)
    windows = settings.windows if settings.windows is not None else config.windows
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
        labels = tuple(sorted((*settings.labels, ("org_id", org_id))))
        sets.append(OrgSet(name=name, org_ids=(org_id,), labels=labels, windows=windows))
    return tuple(sets)
