"""A faithful stand-in for Devin's GET /v2/enterprise/metrics/usage, with switchable faults."""

from __future__ import annotations

import argparse
import asyncio
import calendar
import collections
import contextlib
import hashlib
import hmac
import http
import json
import math
import os
import random
import re
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Final, Literal, TypeAlias, TypedDict, Unpack, cast, get_args

from aiohttp import web
from aiohttp.typedefs import Handler

__all__ = [
    "DEFAULT_DEMO_KEY",
    "ENTERPRISE_ORG_IDS",
    "FAULTS_KEY",
    "MALFORMED_KINDS",
    "REQUESTS_KEY",
    "USAGE_FIELDS",
    "USAGE_PATH",
    "CreateAppOptions",
    "Faults",
    "MalformedKind",
    "RecordedRequest",
    "create_app",
    "expected_usage",
    "main",
    "parse_datetime",
    "start_simulator",
]

JSONValue: TypeAlias = bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"] | None

DEFAULT_DEMO_KEY: Final = "apk_user_simulator"
USAGE_PATH: Final = "/v2/enterprise/metrics/usage"
USAGE_FIELDS: Final = ("sessions_count", "searches_count", "prs_opened", "prs_closed", "prs_merged")
# "No org_ids" means the whole enterprise. It holds the org ids of the built-in demo config and of
# the SPEC's example, so those org sets are subsets of the enterprise, as they would be upstream.
ENTERPRISE_ORG_IDS: Final = (
    "org-platform-1",
    "org-platform-2",
    "org-mobile",
    "org-123",
    "org-456",
    "org-789",
)

MalformedKind = Literal["json", "types", "negative", "huge", "missing", "empty", "array"]
MALFORMED_KINDS: Final[tuple[str, ...]] = get_args(MalformedKind)

# Bounded so a long-running demo does not grow without limit; tests look at far fewer.
_MAX_RECORDED_REQUESTS: Final = 10_000
_LOGIN_PATH: Final = "/login"
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


# --------------------------------------------------------------------------------------------
# The counts
# --------------------------------------------------------------------------------------------

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


def _user_fraction(user_ids: Sequence[str]) -> float:
    """The share of activity the given users account for; 1.0 when there is no user filter.

    Each user has a stable share and the fraction is their capped sum, so it depends only on the
    set of ids (not their order) and a superset of users never sees less than a subset.
    """
    unique = sorted(set(user_ids))
    if not unique:
        return 1.0
    return min(1.0, sum(0.01 + 0.07 * _unit("user", u) for u in unique))


def _hours(t: datetime) -> float:
    return (t - _EPOCH).total_seconds() / 3600.0


def _wave(hours: float, rate: float, phase: float) -> float:
    """Cumulative events up to `hours` for a rate with a daily wave; strictly increasing."""
    omega = 2.0 * math.pi / 24.0
    return rate * (hours + _WAVE_AMPLITUDE / omega * math.sin(omega * hours + phase))


def _cumulative(
    profile: _OrgProfile, fraction: float, t: datetime
) -> tuple[int, int, int, int, int]:
    """Integer cumulative counts of each field for one org up to t.

    PR counts are nested floors of the one below them (the j-th session opens a PR when
    floor(j*p) steps), so within any window merged <= closed <= opened <= sessions holds
    exactly, and a window's count is end minus start, so windows add up.
    """
    h = _hours(t)
    sessions = math.floor(fraction * _wave(h, profile.sessions_per_hour, profile.phase))
    # Searches trail sessions by about an hour: same shape, not an exact multiple.
    searches = math.floor(
        fraction
        * _wave(h, profile.sessions_per_hour * profile.searches_per_session, profile.phase - 0.25)
    )
    opened = math.floor(sessions * profile.p_opened)
    closed = math.floor(opened * profile.p_closed)
    merged = math.floor(closed * profile.p_merged)
    return sessions, searches, opened, closed, merged


def _as_utc(t: datetime) -> datetime:
    # Naive means UTC, as the endpoint treats timezone-less query values.
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _billing_cycle_start(now: datetime) -> datetime:
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def expected_usage(
    org_ids: Sequence[str],
    user_ids: Sequence[str],
    start: datetime | None,
    end: datetime | None,
    *,
    now: datetime,
) -> dict[str, int]:
    """The exact counts the simulated endpoint returns for this query at time `now`.

    A missing `start` is the first of `now`'s month (00:00 UTC), a missing `end` is `now`;
    together that is the billing cycle. Nothing has happened after `now`, so the window is
    clipped to it. Raises ValueError if start > end.
    """
    now = _as_utc(now)
    start = _billing_cycle_start(now) if start is None else _as_utc(start)
    end = now if end is None else _as_utc(end)
    if start > end:
        raise ValueError("start must not be after end")
    end = min(end, now)
    start = min(start, end)

    orgs = list(dict.fromkeys(org_ids)) or list(ENTERPRISE_ORG_IDS)  # duplicates count once
    fraction = _user_fraction(user_ids)
    totals = [0] * len(USAGE_FIELDS)
    for org in orgs:
        profile = _org_profile(org)
        at_end = _cumulative(profile, fraction, end)
        at_start = _cumulative(profile, fraction, start)
        for i in range(len(totals)):
            totals[i] += at_end[i] - at_start[i]
    return dict(zip(USAGE_FIELDS, totals, strict=True))


# --------------------------------------------------------------------------------------------
# Query parsing, as pydantic v2 (behind FastAPI) does it
# --------------------------------------------------------------------------------------------


class _DateParseError(ValueError):
    """Carries pydantic's wording for why a value is not a datetime."""


_DATETIME_RE: Final = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt_ ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d+))?)?"
    r"(?:([Zz])|([+-])(\d{2}):?(\d{2}))?",
    re.ASCII,
)
_NUMBER_RE: Final = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)", re.ASCII)
_MAX_I64: Final = 2**63 - 1
_MAX_TIMESTAMP: Final = 253402300799  # 9999-12-31T23:59:59Z
_MIN_TIMESTAMP: Final = -62135596800  # 0001-01-01T00:00:00Z


def _parse_rfc3339(value: str) -> datetime | None:
    m = _DATETIME_RE.fullmatch(value)
    if m is None:
        return None
    year, month, day, hour, minute = (int(g) for g in m.group(1, 2, 3, 4, 5))
    second = int(m.group(6) or 0)
    micro = int((m.group(7) or "0")[:6].ljust(6, "0"))  # pydantic truncates beyond microseconds
    tz: timezone | None = None
    if m.group(8):
        tz = UTC
    elif m.group(9):
        tz_h, tz_m = int(m.group(10)), int(m.group(11))
        if tz_h > 23 or tz_m > 59:
            return None
        offset = timedelta(hours=tz_h, minutes=tz_m)
        tz = timezone(-offset if m.group(9) == "-" else offset)
    if hour > 23 or minute > 59 or second > 59:  # no leap seconds, as pydantic
        return None
    try:
        return datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)
    except ValueError:
        return None


def _parse_timestamp(value: str) -> datetime | None:
    """Unix seconds, or milliseconds beyond 2e10 in magnitude, as pydantic accepts them."""
    if _NUMBER_RE.fullmatch(value) is None:
        return None
    whole = value.split(".", 1)[0].lstrip("+-")
    if whole and int(whole) > _MAX_I64:
        return None  # pydantic does not read it as a number either, and falls back to a date
    seconds = float(value)
    if abs(seconds) > 20_000_000_000:
        seconds /= 1000.0
    if seconds > _MAX_TIMESTAMP:
        raise _DateParseError("dates after 9999 are not supported as unix timestamps")
    if seconds < _MIN_TIMESTAMP:
        raise _DateParseError("dates before 0000 are not supported as unix timestamps")
    return _EPOCH + timedelta(seconds=seconds)


def _parse_date(value: str) -> date:
    """A bare YYYY-MM-DD, raising with the message pydantic gives for the first fault it meets."""
    raw = value.encode()  # pydantic measures and indexes UTF-8 bytes, not characters
    if len(raw) < 10:
        raise _DateParseError("input is too short")
    steps = (
        (raw[0:4], "invalid character in year"),
        (raw[4:5], None),
        (raw[5:7], "invalid character in month"),
        (raw[7:8], None),
        (raw[8:10], "invalid character in day"),
    )
    for part, message in steps:
        if message is None:
            if part != b"-":
                raise _DateParseError("invalid date separator, expected `-`")
        elif not part.isdigit():  # bytes.isdigit() is ASCII-only
            raise _DateParseError(message)
    year, month, day = int(raw[0:4]), int(raw[5:7]), int(raw[8:10])
    if not 1 <= month <= 12:
        raise _DateParseError("month value is outside expected range of 1-12")
    # Year 0 is a leap year in the proleptic calendar pydantic checks days against, like 2000.
    if not 1 <= day <= calendar.monthrange(year or 2000, month)[1]:
        raise _DateParseError("day value is outside expected range")
    if len(raw) > 10:
        raise _DateParseError("unexpected extra characters at the end of the input")
    if year == 0:  # valid to pydantic's parser, but Python (and pydantic) cannot represent it
        raise _DateParseError("year 0 is out of range")
    return date(year, month, day)


def parse_datetime(value: str) -> datetime:
    """Parse a query value the way FastAPI's `datetime | None` parameter would, into UTC.

    RFC 3339 / ISO 8601 with `T`, `t`, `_` or space; `Z` or `±HH:MM` / `±HHMM` offsets; a bare
    date (midnight); or a unix timestamp. Naive values are taken as UTC. Raises ValueError with
    pydantic's reason text (e.g. "input is too short") otherwise.
    """
    parsed = _parse_rfc3339(value)
    if parsed is None:
        parsed = _parse_timestamp(value)
    if parsed is None:
        # pydantic reports the date parser's complaint when a datetime does not parse.
        d = _parse_date(value)
        parsed = datetime(d.year, d.month, d.day)
    return _as_utc(parsed)


def _validation_error(
    error_type: str, name: str, msg: str, value: str | None, ctx: dict[str, JSONValue] | None = None
) -> dict[str, JSONValue]:
    entry: dict[str, JSONValue] = {
        "type": error_type,
        "loc": ["query", name],
        "msg": msg,
        "input": value,
    }
    if ctx is not None:
        entry["ctx"] = ctx
    return entry


# --------------------------------------------------------------------------------------------
# Faults and app state
# --------------------------------------------------------------------------------------------


def _check_number(name: str, value: object, *, low: float, high: float | None = None) -> float:
    # bool is an int in Python but never a sensible latency or rate; inf would be a silent hang.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number")
    if value < low or (high is not None and value > high):
        bounds = f"between {low:g} and {high:g}" if high is not None else f">= {low:g}"
        raise ValueError(f"{name} must be {bounds}, got {value!r}")
    return float(value)


@dataclass
class Faults:
    """Switchable misbehaviour of the simulated endpoint; everything is off by default.

    Mutate it in place (tests hold the same object the app uses) or POST to `/-/faults`.
    Faults apply only to the usage endpoint, never to the `/-/` control plane.
    """

    latency: float = 0.0  # seconds added before every answer
    error_rate: float = 0.0  # share of requests answered 500 with an HTML body (seeded RNG)
    status: int | None = None  # answer every request with this status (400-599)
    retry_after: str | None = "1"  # Retry-After sent with fault 429s; None sends no header
    malformed: MalformedKind | None = None  # a broken 200 body, see MALFORMED_KINDS
    hang: bool = False  # never answer (released on app shutdown)
    redirect: bool = False  # 302 to a login page, as an SSO proxy in the path would
    rate_limit_per_second: float | None = None  # token bucket per API key; 429 when empty

    def __post_init__(self) -> None:
        self._validate(self.to_json())

    def to_json(self) -> dict[str, JSONValue]:
        return {f.name: cast(JSONValue, getattr(self, f.name)) for f in fields(self)}

    def update(self, changes: Mapping[str, object]) -> None:
        """Apply several fields at once; nothing changes if any name or value is invalid."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(
                f"unknown fault field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        merged = {**self.to_json(), **changes}
        self._validate(merged)
        for name, value in changes.items():
            if name in ("latency", "error_rate") or (
                name == "rate_limit_per_second" and value is not None
            ):
                value = float(cast(float, value))
            setattr(self, name, value)

    def reset(self) -> None:
        defaults = Faults()
        for f in fields(self):
            setattr(self, f.name, getattr(defaults, f.name))

    @staticmethod
    def _validate(values: Mapping[str, object]) -> None:
        _check_number("latency", values["latency"], low=0.0)
        _check_number("error_rate", values["error_rate"], low=0.0, high=1.0)
        status = values["status"]
        if status is not None and (
            isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599
        ):
            raise ValueError(f"status must be null or an integer from 400 to 599, got {status!r}")
        if values["retry_after"] is not None and not isinstance(values["retry_after"], str):
            raise ValueError("retry_after must be null or a string (seconds or an HTTP date)")
        if values["malformed"] is not None and values["malformed"] not in MALFORMED_KINDS:
            raise ValueError(f"malformed must be null or one of {', '.join(MALFORMED_KINDS)}")
        for flag in ("hang", "redirect"):
            if not isinstance(values[flag], bool):
                raise ValueError(f"{flag} must be true or false")
        rate = values["rate_limit_per_second"]
        if rate is not None and _check_number("rate_limit_per_second", rate, low=0.0) <= 0:
            raise ValueError("rate_limit_per_second must be > 0 or null")


@dataclass
class RecordedRequest:
    """One request the simulator received; `status` stays None while it has not been answered."""

    time: datetime
    method: str
    path: str
    query: dict[str, list[str]]
    user_agent: str | None
    status: int | None = None

    def to_json(self) -> dict[str, JSONValue]:
        query: dict[str, JSONValue] = {k: list[JSONValue](v) for k, v in self.query.items()}
        return {
            "time": self.time.isoformat(),
            "method": self.method,
            "path": self.path,
            "query": query,
            "user_agent": self.user_agent,
            "status": self.status,
        }


@dataclass
class _TokenBucket:
    rate: float
    capacity: float
    tokens: float
    updated: datetime

    def take(self, now: datetime) -> float | None:
        """Take a token; None if one was available, else seconds until one will be."""
        elapsed = max(0.0, (now - self.updated).total_seconds())  # a clock going back adds nothing
        self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
        self.updated = max(self.updated, now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return None
        return (1.0 - self.tokens) / self.rate


@dataclass
class _State:
    api_key: str | None
    clock: Callable[[], datetime]
    rng: random.Random
    shutdown: asyncio.Event = field(default_factory=asyncio.Event)
    buckets: dict[str, _TokenBucket] = field(default_factory=dict)


FAULTS_KEY: Final = web.AppKey("simulator_faults", Faults)
REQUESTS_KEY: Final = web.AppKey("simulator_requests", collections.deque[RecordedRequest])
_STATE_KEY: Final = web.AppKey("simulator_state", _State)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _detail(status: int, detail: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"detail": detail}, status=status, headers=headers)


def _html_error(status: int) -> web.Response:
    phrase = http.HTTPStatus(status).phrase
    return web.Response(
        status=status,
        text=f"<html><body><h1>{status} {phrase}</h1></body></html>",
        content_type="text/html",
    )


def _fault_status_response(status: int, retry_after: str | None) -> web.Response:
    if status == 429:
        headers = {"Retry-After": retry_after} if retry_after is not None else None
        return _detail(429, "Too Many Requests", headers)
    if status >= 500:
        # What a load balancer in front of the API sends, not FastAPI: HTML, not JSON.
        return _html_error(status)
    if status == 401:
        return _detail(401, "Invalid API key", {"WWW-Authenticate": "Bearer"})
    if status == 403:
        return _detail(403, "Enterprise admin API key required")
    return _detail(status, http.HTTPStatus(status).phrase)


def _malformed_response(kind: str, counts: dict[str, int]) -> web.Response:
    body: JSONValue
    if kind == "json":
        return web.Response(
            status=200, text='{"sessions_count": 1,', content_type="application/json"
        )
    if kind == "empty":
        return web.Response(status=200, body=b"", content_type="application/json")
    if kind == "types":
        body = {k: str(v) for k, v in counts.items()}
    elif kind == "negative":
        body = {**counts, "sessions_count": -1}
    elif kind == "huge":
        body = {**counts, "sessions_count": 2**64}
    elif kind == "missing":
        body = {k: v for k, v in counts.items() if k != "prs_merged"}
    else:  # "array"
        body = [dict[str, JSONValue](counts)]
    return web.json_response(body)


# --------------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------------


@web.middleware
async def _record_and_shape_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Record API traffic; answer routing errors with FastAPI's JSON, not aiohttp's text."""
    record: RecordedRequest | None = None
    # The control plane is not traffic under test, and /-/requests would otherwise list itself.
    if not request.path.startswith("/-/"):
        query: dict[str, list[str]] = {}
        for key, value in request.query.items():
            query.setdefault(key, []).append(value)
        record = RecordedRequest(
            time=request.app[_STATE_KEY].clock(),
            method=request.method,
            path=request.path,
            query=query,
            user_agent=request.headers.get("User-Agent"),
        )
        request.app[REQUESTS_KEY].append(record)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            if record is not None:
                record.status = exc.status
            raise
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        response = _detail(exc.status, exc.reason, allow)
    if record is not None:
        record.status = response.status
    return response


def _check_bearer(request: web.Request, state: _State) -> web.Response | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    challenge = {"WWW-Authenticate": "Bearer"}
    if scheme.lower() != "bearer" or not token:
        return _detail(401, "Not authenticated", challenge)
    if state.api_key is not None and not hmac.compare_digest(
        token.encode(), state.api_key.encode()
    ):
        return _detail(401, "Invalid API key", challenge)
    return None


def _rate_limited(request: web.Request, state: _State, faults: Faults) -> web.Response | None:
    rate = faults.rate_limit_per_second
    if rate is None:
        state.buckets.clear()
        return None
    now = state.clock()
    key = request.headers.get("Authorization", "")  # the limit is per API key, as upstream
    bucket = state.buckets.get(key)
    if bucket is None or bucket.rate != rate:
        capacity = max(1.0, rate)  # a burst of one second's worth
        bucket = state.buckets[key] = _TokenBucket(rate, capacity, capacity, now)
    wait = bucket.take(now)
    if wait is None:
        return None
    return _detail(429, "Too Many Requests", {"Retry-After": str(max(1, math.ceil(wait)))})


def _read_window(
    request: web.Request,
) -> tuple[datetime | None, datetime | None] | list[dict[str, JSONValue]]:
    """The (start, end) the query asks for, or FastAPI-shaped validation errors."""
    errors: list[dict[str, JSONValue]] = []
    parsed: dict[str, datetime] = {}
    raw: dict[str, str] = {}
    for name in ("start_date", "end_date", "start", "end"):  # FastAPI's declaration order
        values = request.query.getall(name, [])
        if not values:
            continue
        value = values[-1]  # like Starlette, the last of repeated scalar keys wins
        raw[name] = value
        try:
            parsed[name] = parse_datetime(value)
        except ValueError as exc:
            reason = str(exc)
            errors.append(
                _validation_error(
                    "datetime_from_date_parsing",
                    name,
                    f"Input should be a valid datetime or date, {reason}",
                    value,
                    {"error": reason},
                )
            )
    # The documented names win over the aliases when both are sent.
    start_name = "start_date" if "start_date" in raw else "start" if "start" in raw else None
    end_name = "end_date" if "end_date" in raw else "end" if "end" in raw else None
    # The real API's behaviour with only one bound is undocumented. The exporter always sends
    # both or neither, so the simulator is stricter than upstream here: a half-built window is a
    # bug in the exporter, and failing loudly catches it.
    if (start_name is None) != (end_name is None):
        missing = "start_date" if start_name is None else "end_date"
        errors.append(_validation_error("missing", missing, "Field required", None))
    if errors:
        return errors
    if start_name is None or end_name is None:
        return None, None
    start, end = parsed[start_name], parsed[end_name]
    if start > end:
        return [
            _validation_error(
                "value_error",
                start_name,
                f"Value error, {start_name} must not be after {end_name}",
                raw[start_name],
                {"error": {}},  # FastAPI serialises the ValueError in ctx as an empty object
            )
        ]
    return start, end


async def _usage(request: web.Request) -> web.StreamResponse:
    state = request.app[_STATE_KEY]
    faults = request.app[FAULTS_KEY]

    if faults.latency > 0:
        # Wake early on shutdown so a slow simulator never holds up a clean stop.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.shutdown.wait(), faults.latency)
    if faults.hang:
        await state.shutdown.wait()
        return _detail(503, "Simulator shutting down")
    if faults.redirect:
        return web.Response(status=302, headers={"Location": _LOGIN_PATH})
    if faults.status is not None:
        return _fault_status_response(faults.status, faults.retry_after)
    # Draw for every request, so the n-th request's fate depends only on the seed.
    if state.rng.random() < faults.error_rate:
        return _html_error(500)

    denied = _check_bearer(request, state)
    if denied is not None:
        return denied
    limited = _rate_limited(request, state, faults)
    if limited is not None:
        return limited

    window = _read_window(request)
    if isinstance(window, list):
        return web.json_response({"detail": window}, status=422)
    start, end = window
    # An end in the future is accepted and counts stop at "now": a clock-skewed exporter
    # should see plausible numbers, not an error upstream never documented.
    counts = expected_usage(
        request.query.getall("org_ids", []),
        request.query.getall("user_ids", []),
        start,
        end,
        now=state.clock(),
    )
    if faults.malformed is not None:
        return _malformed_response(faults.malformed, counts)
    return web.json_response(counts)


async def _login(request: web.Request) -> web.StreamResponse:
    # 200 with HTML: a client that follows the redirect must still notice it got no metrics.
    return web.Response(
        text="<html><body><h1>Sign in</h1><form method='post'></form></body></html>",
        content_type="text/html",
    )


async def _get_faults(request: web.Request) -> web.StreamResponse:
    return web.json_response(request.app[FAULTS_KEY].to_json())


async def _post_faults(request: web.Request) -> web.StreamResponse:
    try:
        changes: object = await request.json()
    except json.JSONDecodeError as exc:
        return _detail(400, f"body is not JSON: {exc}")
    if not isinstance(changes, dict):
        return _detail(400, "body must be a JSON object of fault fields")
    faults = request.app[FAULTS_KEY]
    try:
        faults.update(cast(dict[str, object], changes))
    except ValueError as exc:
        return _detail(400, str(exc))
    return web.json_response(faults.to_json())


async def _delete_faults(request: web.Request) -> web.StreamResponse:
    faults = request.app[FAULTS_KEY]
    faults.reset()
    return web.json_response(faults.to_json())


async def _get_requests(request: web.Request) -> web.StreamResponse:
    return web.json_response([r.to_json() for r in request.app[REQUESTS_KEY]])


async def _delete_requests(request: web.Request) -> web.StreamResponse:
    request.app[REQUESTS_KEY].clear()
    return web.json_response([])


async def _release_hung_requests(app: web.Application) -> None:
    # on_shutdown runs before the runner waits for in-flight handlers, so hung ones end now.
    app[_STATE_KEY].shutdown.set()


def create_app(
    *,
    api_key: str | None = DEFAULT_DEMO_KEY,
    faults: Faults | None = None,
    clock: Callable[[], datetime] | None = None,
    seed: int = 0,
) -> web.Application:
    """The simulator as an aiohttp app.

    `api_key=None` accepts any bearer token (the header is still required). `clock` returns
    the current time (aware, or naive meaning UTC) for counts, rate limiting and records.
    `seed` makes the `error_rate` fault reproducible.
    """
    app = web.Application(middlewares=[_record_and_shape_errors])
    app[FAULTS_KEY] = faults if faults is not None else Faults()
    app[REQUESTS_KEY] = collections.deque(maxlen=_MAX_RECORDED_REQUESTS)
    app[_STATE_KEY] = _State(api_key=api_key, clock=clock or _utc_now, rng=random.Random(seed))
    app.router.add_get(USAGE_PATH, _usage)
    app.router.add_get(_LOGIN_PATH, _login)
    app.router.add_get("/-/faults", _get_faults)
    app.router.add_post("/-/faults", _post_faults)
    app.router.add_delete("/-/faults", _delete_faults)
    app.router.add_get("/-/requests", _get_requests)
    app.router.add_delete("/-/requests", _delete_requests)
    app.on_shutdown.append(_release_hung_requests)
    return app


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------


class CreateAppOptions(TypedDict, total=False):
    """Keyword arguments of create_app, for start_simulator."""

    api_key: str | None
    faults: Faults | None
    clock: Callable[[], datetime] | None
    seed: int


# Hung and slow handlers are released on shutdown, so this only bounds the unexpected.
_SHUTDOWN_TIMEOUT: Final = 2.0


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def start_simulator(
    host: str = "127.0.0.1", port: int = 0, **create_app_kwargs: Unpack[CreateAppOptions]
) -> tuple[web.AppRunner, str]:
    """Serve the simulator on host:port (0 picks a free port); returns the runner and base URL.

    Stop it with `await runner.cleanup()`.
    """
    runner = web.AppRunner(
        create_app(**create_app_kwargs), access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = int(runner.addresses[0][1])  # the real port when 0 was asked for
    return runner, _url(host, bound_port)


def _listen_address(value: str) -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT with a port from 0 to 65535, got {value!r}"
        )
    return host, int(port_text)


def _non_negative(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not (math.isfinite(number) and number >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value!r}")
    return number


def _share(value: str) -> float:
    number = _non_negative(value)
    if number > 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value!r}")
    return number


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="devin-usage-exporter simulate",
        description="Serve a simulated Devin usage metrics API (GET "
        + USAGE_PATH
        + ") for demos and tests.",
    )
    parser.add_argument(
        "--listen",
        type=_listen_address,
        default=("127.0.0.1", 8080),
        metavar="HOST:PORT",
        help="address to serve on; port 0 picks a free port (default: 127.0.0.1:8080)",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help=f"bearer token to accept (default: $DEVIN_API_KEY, else {DEFAULT_DEMO_KEY})",
    )
    parser.add_argument(
        "--latency", type=_non_negative, default=0.0, help="seconds added to every response"
    )
    parser.add_argument(
        "--error-rate", type=_share, default=0.0, help="share of requests answered 500, from 0 to 1"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the error-rate RNG (default: 0)"
    )
    return parser


async def _serve(host: str, port: int, options: CreateAppOptions) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner, url = await start_simulator(host, port, **options)
    try:
        print(f"simulator listening on {url}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulator until SIGTERM or SIGINT; 0 on a clean stop, 1 if it cannot listen."""
    args = _parser().parse_args(argv)
    host, port = cast(tuple[str, int], args.listen)
    api_key = cast(str | None, args.api_key) or os.environ.get("DEVIN_API_KEY") or DEFAULT_DEMO_KEY
    options: CreateAppOptions = {
        "api_key": api_key,
        "faults": Faults(
            latency=cast(float, args.latency), error_rate=cast(float, args.error_rate)
        ),
        "seed": cast(int, args.seed),
    }
    try:
        asyncio.run(_serve(host, port, options))
    except OSError as exc:
        print(f"simulator: cannot listen on {_url(host, port)}: {exc}", file=sys.stderr)
        return 1
    return 0
