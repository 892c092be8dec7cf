"""The simulated enterprise's numbers: a pure, deterministic function of (filters, bounds, now)."""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

__all__ = [
    "BILLING_CYCLE_DAY",
    "BILLING_DAY_START",
    "DEFAULT_ORGANIZATIONS",
    "ENTERPRISE_ORG_IDS",
    "EPOCH",
    "INCEPTION",
    "Membership",
    "Organization",
    "as_utc",
    "billing_cycle",
    "billing_cycles",
    "billing_day_start",
    "created_at",
    "membership",
    "queue_size",
    "scope",
    "updated_at",
    "usage_counts",
    "window",
]

EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

def as_utc(t: datetime) -> datetime:
    """Naive means UTC, as the upstream API treats timezone-less query values."""
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


# --------------------------------------------------------------------------------------------
# Organizations
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Organization:
    """One organization of the enterprise, as the organizations endpoints list it.

    `created_at` / `updated_at` of None stand for stable instants derived from the org id (see
    `created_at()` and `updated_at()`), so a test can write `Organization("org-x", "X")`.
    """

    org_id: str
    name: str
    max_cycle_acu_limit: int | None = None
    max_session_acu_limit: int | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


# Names are what a dashboard shows; limits are in ACUs, null where an org has none.
DEFAULT_ORGANIZATIONS: Final = (
    Organization("org-platform-1", "Platform", 60_000, 400),
    Organization("org-platform-2", "Platform Data"),
    Organization("org-mobile", "Mobile", 40_000, 250),
    Organization("org-123", "Payments", None, 150),
    Organization("org-456", "Growth", 25_000),
    Organization("org-789", "Support Tools"),
)
# The ids of the default organizations: the built-in demo config's and the SPEC example's, so
# those org sets are subsets of the enterprise, as they would be upstream.
ENTERPRISE_ORG_IDS: Final = tuple(o.org_id for o in DEFAULT_ORGANIZATIONS)


def scope(org_ids: Iterable[str], enterprise_org_ids: Sequence[str]) -> list[str]:
    """The orgs a filter means: its ids, each once, in order; no ids means the whole enterprise."""
    return list(dict.fromkeys(org_ids)) or list(dict.fromkeys(enterprise_org_ids))


# The billing calendar. Upstream's billing day starts at midnight PST, which the docs pin to a fixed
# 08:00 UTC all year (no PDT shift); cycles are monthly. The 5th matches the docs' own example
# (`start_date=2025-12-05T08:00:00Z&end_date=2026-01-05T08:00:00Z`).
BILLING_DAY_START: Final = timedelta(hours=8)
BILLING_CYCLE_DAY: Final = 5
# The first billing cycle of the simulated enterprise: the cycles endpoints list from here.
INCEPTION: Final = datetime(2025, 3, BILLING_CYCLE_DAY, tzinfo=UTC) + BILLING_DAY_START


def _cycle_start_in(year: int, month: int) -> datetime:
    return datetime(year, month, BILLING_CYCLE_DAY, tzinfo=UTC) + BILLING_DAY_START


def _next_month(year: int, month: int) -> tuple[int, int]:
    return (year + 1, 1) if month == 12 else (year, month + 1)


def billing_cycle(t: datetime) -> tuple[datetime, datetime]:
    """The billing cycle holding instant t as [start, end): from the 5th of a month, 08:00 UTC."""
    t = as_utc(t)
    year, month = t.year, t.month
    if t < _cycle_start_in(year, month):
        year, month = (year - 1, 12) if month == 1 else (year, month - 1)
    return _cycle_start_in(year, month), _cycle_start_in(*_next_month(year, month))


def billing_cycles(now: datetime) -> list[tuple[datetime, datetime]]:
    """Every cycle from INCEPTION to the current one (whose end is still ahead), oldest first."""
    current, _ = billing_cycle(now)
    cycles: list[tuple[datetime, datetime]] = []
    year, month = INCEPTION.year, INCEPTION.month
    while (start := _cycle_start_in(year, month)) <= current:
        year, month = _next_month(year, month)
        cycles.append((start, _cycle_start_in(year, month)))
    return cycles


def billing_day_start(t: datetime) -> datetime:
    """The start (08:00 UTC) of the billing day holding instant t."""
    shifted = as_utc(t) - BILLING_DAY_START
    return shifted.replace(hour=0, minute=0, second=0, microsecond=0) + BILLING_DAY_START


def window(start: datetime | None, end: datetime | None, now: datetime) -> tuple[datetime, datetime]:
    """The bounds a query means at `now`: a missing start is the current billing cycle's start, a
    missing end is now, and nothing happens after now, so both are clipped to it.

    Raises ValueError if start > end (before clipping).
    """
    now = as_utc(now)
    start = billing_cycle(now)[0] if start is None else as_utc(start)
    end = now if end is None else as_utc(end)
    if start > end:
        raise ValueError("start must not be after end")
    end = min(end, now)
    return min(start, end), end


def _seconds(t: datetime) -> datetime:
    return t.replace(microsecond=0)


def created_at(org: Organization) -> datetime:
    """When the organization was created: its own value, else a stable day in the enterprise's
    first 300 days."""
    if org.created_at is not None:
        return as_utc(org.created_at)
    return _seconds(INCEPTION + timedelta(days=300 * _unit("created", org.org_id)))


def updated_at(org: Organization) -> datetime:
    """When it last changed: its own value, else a stable instant within 60 days of creation."""
    if org.updated_at is not None:
        return as_utc(org.updated_at)
    return _seconds(created_at(org) + timedelta(days=60 * _unit("updated", org.org_id)))


@dataclass(frozen=True)
class Membership:
    """Head counts of one organization: admins <= members and users <= members."""

    admins: int
    members: int
    users: int  # members who have used Devin at least once


@functools.lru_cache(maxsize=4096)
def membership(org_id: str) -> Membership:
    members = 12 + math.floor(140 * _unit("members", org_id))
    return Membership(
        admins=1 + math.floor(4 * _unit("admins", org_id)),
        members=members,
        users=math.ceil(members * (0.6 + 0.35 * _unit("users", org_id))),
    )


# The daily wave's relative amplitude. Below 1 so the cumulative curve's slope,
# rate * (1 + A*cos), never goes negative: counts can only grow as a window lengthens.
_WAVE_AMPLITUDE: Final = 0.6


def _unit(*parts: str) -> float:
    """A stable number in [0, 1) for the given key; sha256 because hash() is salted per process."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class _OrgProfile:
    sessions_per_hour: float
    phase: float  # radians; orgs peak at different hours of the day
    searches_per_session: float
    p_opened: float  # share of sessions that open a PR
    p_closed: float  # share of opened PRs that get closed
    p_merged: float  # share of closed PRs that were merged


def _org_profile(org_id: str) -> _OrgProfile:
    return _OrgProfile(
        sessions_per_hour=5.0 + 45.0 * _unit("sessions", org_id),
        phase=2.0 * math.pi * _unit("phase", org_id),
        searches_per_session=1.5 + 2.5 * _unit("searches", org_id),
        p_opened=0.25 + 0.35 * _unit("opened", org_id),
        p_closed=0.70 + 0.25 * _unit("closed", org_id),
        p_merged=0.60 + 0.30 * _unit("merged", org_id),
    )


def _user_fraction(user_ids: Iterable[str]) -> float:
    """The share of activity the given users account for; 1.0 when there is no user filter.

    Each user has a stable share and the fraction is their capped sum, so it depends only on the
    set of ids (not their order) and a superset of users never sees less than a subset.
    """
    unique = sorted(set(user_ids))
    if not unique:
        return 1.0
    return min(1.0, sum(0.01 + 0.07 * _unit("user", u) for u in unique))


def _hours(t: datetime) -> float:
    return (t - EPOCH).total_seconds() / 3600.0


def _wave(hours: float, rate: float, phase: float) -> float:
    """Cumulative events up to `hours` for a rate with a daily wave; strictly increasing."""
    omega = 2.0 * math.pi / 24.0
    return rate * (hours + _WAVE_AMPLITUDE / omega * math.sin(omega * hours + phase))


def _cumulative(profile: _OrgProfile, fraction: float, t: datetime) -> tuple[int, int, int, int, int]:
    """Integer cumulative counts of each field for one org up to t.

    PR counts are nested floors of the one below them (the j-th session opens a PR when
    floor(j*p) steps), so within any window merged <= closed <= opened <= sessions holds
    exactly, and a window's count is end minus start, so windows add up.
    """
    h = _hours(t)
    sessions = math.floor(fraction * _wave(h, profile.sessions_per_hour, profile.phase))
    # Searches trail sessions by about an hour: same shape, not an exact multiple.
    searches = math.floor(
        fraction * _wave(h, profile.sessions_per_hour * profile.searches_per_session, profile.phase - 0.25)
    )
    opened = math.floor(sessions * profile.p_opened)
    closed = math.floor(opened * profile.p_closed)
    merged = math.floor(closed * profile.p_merged)
    return sessions, searches, opened, closed, merged


def usage_counts(
    orgs: Sequence[str], user_ids: Iterable[str], start: datetime, end: datetime
) -> tuple[int, int, int, int, int]:
    """Sessions, searches, PRs opened, closed and merged of `orgs` by `user_ids` in [start, end]."""
    fraction = _user_fraction(user_ids)
    totals = [0] * 5
    for org in orgs:
        profile = _org_profile(org)
        at_end = _cumulative(profile, fraction, end)
        at_start = _cumulative(profile, fraction, start)
        for i in range(len(totals)):
            totals[i] += at_end[i] - at_start[i]
    sessions, searches, opened, closed, merged = totals
    return sessions, searches, opened, closed, merged


def queue_size(now: datetime) -> int:
    """Sessions waiting (new, resuming, claimed) at `now`: a daily wave from 0 to about 75, peaking
    in the US working day, with a jitter that changes every minute; so the queue's status goes
    through normal, elevated and high every day."""
    h = _hours(as_utc(now))
    jitter = 12.0 * _unit("queue", str(math.floor(h * 60.0))) - 6.0
    return max(0, round(31.0 + 38.0 * math.sin(2.0 * math.pi * (h - 14.0) / 24.0) + jitter))
