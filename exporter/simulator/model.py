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
    "ENTERPRISE_USER_IDS",
    "EPOCH",
    "INCEPTION",
    "ORIGINS",
    "PRODUCTS",
    "SIZES",
    "Activity",
    "Consumption",
    "Membership",
    "Organization",
    "active_users",
    "activity",
    "acus",
    "as_utc",
    "billing_cycle",
    "billing_cycles",
    "billing_day_start",
    "consumption",
    "created_at",
    "membership",
    "queue_size",
    "scope",
    "updated_at",
    "window",
]

EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def as_utc(t: datetime) -> datetime:
    """Naive means UTC, as the upstream API treats timezone-less query values."""
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _unit(*parts: str) -> float:
    """A stable number in [0, 1) for the given key; sha256 because hash() is salted per process."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


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


# Names are what a dashboard shows; limits are in ACUs, null where an org has none. The cycle
# limits sit above what their orgs spend in a whole cycle (about 28k, 102k and 18k ACUs), Growth's
# just, so a "cycle-to-date vs limit" panel shows an org nearing its cap late in the cycle.
DEFAULT_ORGANIZATIONS: Final = (
    Organization("org-platform-1", "Platform", 40_000, 400),
    Organization("org-platform-2", "Platform Data"),
    Organization("org-mobile", "Mobile", 120_000, 250),
    Organization("org-123", "Payments", None, 150),
    Organization("org-456", "Growth", 20_000),
    Organization("org-789", "Support Tools"),
)
# The ids of the default organizations: the built-in demo config's and the SPEC example's, so
# those org sets are subsets of the enterprise, as they would be upstream.
ENTERPRISE_ORG_IDS: Final = tuple(o.org_id for o in DEFAULT_ORGANIZATIONS)


# The users v2 daily consumption lists in `consumption_by_user`. Any other user id is valid too:
# every user has a stable share of each organization's activity.
ENTERPRISE_USER_IDS: Final = tuple(f"user-{i}" for i in range(1, 13))


def scope(org_ids: Iterable[str], enterprise_org_ids: Sequence[str]) -> list[str]:
    """The orgs a filter means: its ids, each once, in order; no ids means the whole enterprise."""
    return list(dict.fromkeys(org_ids)) or list(dict.fromkeys(enterprise_org_ids))


def _seconds(t: datetime) -> datetime:
    return t.replace(microsecond=0)


def created_at(org: Organization) -> datetime:
    """When the organization was created: its own value, else a stable instant in the enterprise's
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
    users: int  # members who have used Devin at least once: the most `active_users` can reach


@functools.lru_cache(maxsize=4096)
def membership(org_id: str) -> Membership:
    members = 12 + math.floor(140 * _unit("members", org_id))
    return Membership(
        admins=1 + math.floor(4 * _unit("admins", org_id)),
        members=members,
        users=math.ceil(members * (0.6 + 0.35 * _unit("users", org_id))),
    )


# --------------------------------------------------------------------------------------------
# The billing calendar
# --------------------------------------------------------------------------------------------

# Upstream's billing day starts at midnight PST, which the docs pin to a fixed
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
    missing end is now. Nothing happens after now, nor before the enterprise's first billing cycle
    (INCEPTION): both bounds are clipped to that span, so a window entirely before INCEPTION is
    empty and counts nothing, as an enterprise that did not exist yet had no sessions (the API
    docs state no earliest date and no error for one; counts of an empty span are 0).

    Raises ValueError if start > end (before clipping).
    """
    now = as_utc(now)
    start = billing_cycle(now)[0] if start is None else as_utc(start)
    end = now if end is None else as_utc(end)
    if start > end:
        raise ValueError("start must not be after end")
    first = min(INCEPTION, now)
    end = max(min(end, now), first)
    return min(max(start, first), end), end


# --------------------------------------------------------------------------------------------
# Activity: sessions, searches, PRs
# --------------------------------------------------------------------------------------------

# The daily wave's relative amplitude. Below 1 so the cumulative curve's slope,
# rate * (1 + A*cos), never goes negative: counts can only grow as a window lengthens.
_WAVE_AMPLITUDE: Final = 0.6

# The origins and sizes of SessionMetrics, in the docs' order, with a typical share of each.
ORIGINS: Final = ("api", "automation", "desktop", "jira", "linear", "slack", "teams", "webapp")
_ORIGIN_WEIGHTS: Final = (0.12, 0.10, 0.07, 0.07, 0.06, 0.20, 0.04, 0.34)
SIZES: Final = ("xs", "s", "m", "l", "xl")
_SIZE_WEIGHTS: Final = (0.30, 0.30, 0.22, 0.12, 0.06)
_MERGED_SIZE_WEIGHTS: Final = (0.10, 0.25, 0.30, 0.22, 0.13)  # bigger sessions merge more


def _chain(org_id: str, kind: str, weights: Sequence[float]) -> tuple[float, ...]:
    """This org's shares of the weights (each varied by up to ±50%), as `_split` takes them: per
    bucket but the last, the part of what is left that passes on to the buckets after it."""
    varied = [w * (0.5 + _unit(kind, org_id, str(i))) for i, w in enumerate(weights)]
    ratios, remaining = [], sum(varied)
    for share in varied[:-1]:
        ratios.append(min(1.0, max(0.0, 1.0 - share / remaining)))
        remaining -= share
    return tuple(ratios)


@dataclass(frozen=True)
class _OrgProfile:
    sessions_per_hour: float
    phase: float  # radians; orgs peak at different hours of the day
    searches_per_session: float
    p_opened: float  # share of sessions that open a PR
    p_closed: float  # share of opened PRs that get closed
    p_merged: float  # share of closed PRs that were merged
    p_draft: float  # drafts per session: created but never opened for review
    p_playbook: float
    p_search: float
    p_merging_session: float  # sessions with a merged PR, per merged PR (some merge several)
    acus_per_session: float
    origins: tuple[float, ...]  # each a chain for _split
    sizes: tuple[float, ...]
    merged_sizes: tuple[float, ...]


@functools.lru_cache(maxsize=4096)
def _org_profile(org_id: str) -> _OrgProfile:
    return _OrgProfile(
        sessions_per_hour=5.0 + 45.0 * _unit("sessions", org_id),
        phase=2.0 * math.pi * _unit("phase", org_id),
        searches_per_session=1.5 + 2.5 * _unit("searches", org_id),
        p_opened=0.25 + 0.35 * _unit("opened", org_id),
        p_closed=0.70 + 0.25 * _unit("closed", org_id),
        p_merged=0.60 + 0.30 * _unit("merged", org_id),
        p_draft=0.03 + 0.12 * _unit("draft", org_id),
        p_playbook=0.10 + 0.40 * _unit("playbook", org_id),
        p_search=0.20 + 0.50 * _unit("with-search", org_id),
        p_merging_session=0.75 + 0.20 * _unit("merging", org_id),
        acus_per_session=0.8 + 3.2 * _unit("acus", org_id),
        origins=_chain(org_id, "origin", _ORIGIN_WEIGHTS),
        sizes=_chain(org_id, "size", _SIZE_WEIGHTS),
        merged_sizes=_chain(org_id, "merged-size", _MERGED_SIZE_WEIGHTS),
    )


@functools.lru_cache(maxsize=65536)
def _user_share(user_id: str) -> float:
    return 0.01 + 0.07 * _unit("user", user_id)


def _user_fraction(user_ids: Iterable[str]) -> float:
    """The share of activity the given users account for; 1.0 when there is no user filter.

    Each user has a stable share and the fraction is their capped sum, so it depends only on the
    set of ids (not their order) and a superset of users never sees less than a subset.
    """
    unique = sorted(set(user_ids))
    if not unique:
        return 1.0
    return min(1.0, sum(_user_share(u) for u in unique))


def _hours(t: datetime) -> float:
    return (t - EPOCH).total_seconds() / 3600.0


def _wave(hours: float, rate: float, phase: float) -> float:
    """Cumulative events up to `hours` for a rate with a daily wave; strictly increasing."""
    omega = 2.0 * math.pi / 24.0
    return rate * (hours + _WAVE_AMPLITUDE / omega * math.sin(omega * hours + phase))


def _split(total: int, chain: Sequence[float]) -> list[int]:
    """Split a cumulative count into buckets that sum to it exactly and each never shrink as it grows.

    A chain: each bucket keeps `rest - floor(rest * q)` of what is left, and `x - floor(x*q)` and
    `floor(x*q)` are both non-decreasing in x for 0 <= q <= 1. (Splitting by cumulative-share floors
    instead would let a bucket lose one now and then, and a window's count go negative.)
    """
    buckets: list[int] = []
    rest = total
    for passed in chain:
        onward = math.floor(rest * passed)
        buckets.append(rest - onward)
        rest = onward
    buckets.append(rest)
    return buckets


# The layout of one org's cumulative vector, summed and differenced as plain tuples.
_SESSIONS, _SEARCHES, _OPENED, _CLOSED, _MERGED, _CREATED = 0, 1, 2, 3, 4, 5
_PLAYBOOK, _WITH_SEARCH, _MERGING, _DEVIN = 6, 7, 8, 9
_BY_ORIGIN = slice(10, 10 + len(ORIGINS))
_BY_SIZE = slice(_BY_ORIGIN.stop, _BY_ORIGIN.stop + len(SIZES))
_MERGED_BY_SIZE = slice(_BY_SIZE.stop, _BY_SIZE.stop + len(SIZES))


def _sessions_curve(profile: _OrgProfile, fraction: float, hours: float) -> float:
    """Cumulative sessions (unrounded) of the org's share `fraction` up to `hours`."""
    return fraction * _wave(hours, profile.sessions_per_hour, profile.phase)


def _acus(profile: _OrgProfile, curve: float) -> int:
    """Cumulative Devin ACUs, in hundredths, of the sessions up to a point of their curve."""
    return math.floor(100.0 * profile.acus_per_session * curve)


def _cumulative(profile: _OrgProfile, fraction: float, t: datetime) -> tuple[int, ...]:
    """Integer cumulative counts of one org up to t, in the layout above.

    PR counts are nested floors of the one below them (the j-th session opens a PR when
    floor(j*p) steps), so within any window merged <= closed <= opened <= sessions holds
    exactly, and a window's count is end minus start, so windows add up. Devin ACUs are in
    hundredths and follow the sessions' curve, so ACUs per session stay near the org's own figure.
    """
    h = _hours(t)
    curve = _sessions_curve(profile, fraction, h)
    sessions = math.floor(curve)
    # Searches trail sessions by about an hour: same shape, not an exact multiple.
    searches = math.floor(
        fraction
        * _wave(h, profile.sessions_per_hour * profile.searches_per_session, profile.phase - 0.25)
    )
    opened = math.floor(sessions * profile.p_opened)
    closed = math.floor(opened * profile.p_closed)
    merged = math.floor(closed * profile.p_merged)
    merging = math.floor(merged * profile.p_merging_session)
    return (
        sessions,
        searches,
        opened,
        closed,
        merged,
        opened + math.floor(sessions * profile.p_draft),
        math.floor(sessions * profile.p_playbook),
        math.floor(sessions * profile.p_search),
        merging,
        _acus(profile, curve),
        *_split(sessions, profile.origins),
        *_split(sessions, profile.sizes),
        *_split(merging, profile.merged_sizes),
    )


@dataclass(frozen=True)
class Activity:
    """What happened in a window: counts, and the Devin ACUs (hundredths) of those sessions."""

    sessions: int
    searches: int
    prs_opened: int
    prs_closed: int
    prs_merged: int
    prs_created: int  # every PR a session created, drafts included, so >= prs_opened
    sessions_with_playbook: int
    sessions_with_search: int
    sessions_with_merged_prs: int
    devin_hundredths: int
    by_origin: tuple[int, ...]  # in ORIGINS order, summing to sessions
    by_size: tuple[int, ...]  # in SIZES order, summing to sessions
    merged_by_size: tuple[int, ...]  # in SIZES order, summing to sessions_with_merged_prs


def activity(orgs: Sequence[str], user_ids: Iterable[str], start: datetime, end: datetime) -> Activity:
    """The activity of `orgs` (each counted once) by `user_ids` (none: everyone) in [start, end]."""
    fraction = _user_fraction(user_ids)
    totals: list[int] | None = None
    for org in dict.fromkeys(orgs):
        profile = _org_profile(org)
        at_end, at_start = _cumulative(profile, fraction, end), _cumulative(profile, fraction, start)
        diff = [e - s for e, s in zip(at_end, at_start, strict=True)]
        totals = diff if totals is None else [t + d for t, d in zip(totals, diff, strict=True)]
    if totals is None:
        totals = [0] * _MERGED_BY_SIZE.stop
    return Activity(
        sessions=totals[_SESSIONS],
        searches=totals[_SEARCHES],
        prs_opened=totals[_OPENED],
        prs_closed=totals[_CLOSED],
        prs_merged=totals[_MERGED],
        prs_created=totals[_CREATED],
        sessions_with_playbook=totals[_PLAYBOOK],
        sessions_with_search=totals[_WITH_SEARCH],
        sessions_with_merged_prs=totals[_MERGING],
        devin_hundredths=totals[_DEVIN],
        by_origin=tuple(totals[_BY_ORIGIN]),
        by_size=tuple(totals[_BY_SIZE]),
        merged_by_size=tuple(totals[_MERGED_BY_SIZE]),
    )


# --------------------------------------------------------------------------------------------
# Consumption (ACUs, in integer hundredths so every sum is exact)
# --------------------------------------------------------------------------------------------

PRODUCTS: Final = ("devin", "cascade", "terminal", "review")
# ACUs per hour and phase of the products no organization owns (upstream: "usage for these
# products is not tied to any organization"), so only the enterprise-wide total carries them.
_UNOWNED: Final = {"cascade": (40.0, 1.1), "terminal": (9.0, 2.3), "review": (4.0, 4.0)}


def _devin_hundredths(org: str, user_id: str | None, t: datetime) -> int:
    profile = _org_profile(org)
    fraction = 1.0 if user_id is None else _user_fraction([user_id])
    return _acus(profile, _sessions_curve(profile, fraction, _hours(t)))


def _unowned_hundredths(product: str, t: datetime) -> int:
    rate, phase = _UNOWNED[product]
    return math.floor(100.0 * _wave(_hours(t), rate, phase))


def acus(hundredths: int) -> float:
    """Hundredths of an ACU as the ACUs a reply carries: the one place the division happens."""
    return hundredths / 100


@dataclass(frozen=True)
class Consumption:
    """ACUs of a window in hundredths: per billing day and product, and Devin ACUs per org."""

    days: tuple[tuple[datetime, tuple[int, ...]], ...]  # (billing-day start, PRODUCTS order)
    by_org: tuple[tuple[str, int], ...]

    @property
    def total(self) -> int:
        return sum(sum(products) for _, products in self.days)


def consumption(
    orgs: Sequence[str], start: datetime, end: datetime, *, user_id: str | None = None, unowned: bool = False
) -> Consumption:
    """The ACUs of [start, end] (already clipped to now), one entry per billing day it touches.

    Devin ACUs of `orgs` (of `user_id`'s share of them, if given), plus the products no org owns
    when `unowned`. A day the window covers only in part counts that part; an empty window has
    no days. Every figure is a difference of cumulative integers, so days sum to the total and
    products to their day exactly.
    """
    orgs = list(dict.fromkeys(orgs))
    edges = [start]  # the window's bounds and the billing-day starts inside it
    if start < end:
        day = billing_day_start(start) + timedelta(days=1)
        while day < end:
            edges.append(day)
            day += timedelta(days=1)
        edges.append(end)
    devin = {org: [_devin_hundredths(org, user_id, t) for t in edges] for org in orgs}
    others = {p: [_unowned_hundredths(p, t) if unowned else 0 for t in edges] for p in PRODUCTS[1:]}
    days: list[tuple[datetime, tuple[int, ...]]] = []
    for i in range(len(edges) - 1):
        products = (
            sum(d[i + 1] - d[i] for d in devin.values()),
            *(others[p][i + 1] - others[p][i] for p in PRODUCTS[1:]),
        )
        days.append((billing_day_start(edges[i]), products))
    by_org = tuple((org, d[-1] - d[0]) for org, d in devin.items())
    return Consumption(days=tuple(days), by_org=by_org)


# --------------------------------------------------------------------------------------------
# Active users and the queue
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _gaps(org_id: str) -> tuple[float, float]:
    """Mean hours between one user's sessions, and between their searches, in this org."""
    sessions = 48.0 * (1.0 + 6.0 * _unit("session-gap", org_id))  # 2 to 14 days
    return sessions, sessions * (0.8 + 1.2 * _unit("search-gap", org_id))


def active_users(
    orgs: Sequence[str], start: datetime, end: datetime, *, min_sessions: int, min_searches: int
) -> int:
    """Users with at least `min_sessions` sessions or at least `min_searches` searches in [start, end].

    Per org: its users times the chance that a user's session and search counts (Poisson-like, at
    the org's mean gaps) reach a threshold, 1 - exp(-L/(s*gap_s) - L/(q*gap_q)) for a window of L
    hours. That is concave in L (sub-linear growth from 0), falls as s or q rise, and is 1 when
    either is 0 (no one falls short of zero). Orgs' users are distinct, so orgs add up.
    """
    hours = max(0.0, (end - start).total_seconds() / 3600.0)
    total = 0
    for org in dict.fromkeys(orgs):
        users = membership(org).users
        if min_sessions == 0 or min_searches == 0:
            total += users
            continue
        session_gap, search_gap = _gaps(org)
        rate = hours / (min_sessions * session_gap) + hours / (min_searches * search_gap)
        total += math.floor(users * -math.expm1(-rate))
    return total


def queue_size(now: datetime) -> int:
    """Sessions waiting (new, resuming, claimed) at `now`: a daily wave from 0 to about 75, peaking
    in the US working day, with a jitter that changes every minute; so the queue's status goes
    through normal, elevated and high every day."""
    h = _hours(as_utc(now))
    jitter = 12.0 * _unit("queue", str(math.floor(h * 60.0))) - 6.0
    return max(0, round(31.0 + 38.0 * math.sin(2.0 * math.pi * (h - 14.0) / 24.0) + jitter))
