"""Every upstream endpoint the exporter polls, declared once, grouped into the collectors of SPEC §10."""

from __future__ import annotations

from typing import Final

from exporter.catalogue.active_users import ACTIVE_USERS_COLLECTOR
from exporter.catalogue.consumption import CONSUMPTION
from exporter.catalogue.declare import Collector, Family
from exporter.catalogue.organizations import ORGANIZATIONS
from exporter.catalogue.queue import QUEUE
from exporter.catalogue.usage import USAGE

CATALOGUE: Final[tuple[Collector, ...]] = (USAGE, ACTIVE_USERS_COLLECTOR, CONSUMPTION, ORGANIZATIONS, QUEUE)
COLLECTORS: Final = {c.name: c for c in CATALOGUE}


def all_families() -> tuple[Family, ...]:
    """Every family a collector publishes, derived ones included, in catalogue order."""
    return tuple(f for c in CATALOGUE for f in (*c.families, *(d.family for d in c.derived)))
