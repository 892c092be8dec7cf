"""The one HTTP transport per credential: GET a path, errors classified, retries, limits, the per-key pause.

It knows no endpoint: what to ask (path, parameters) and how to read the reply (a parse function)
come from the endpoint declarations in exporter/catalogue.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import math
import random as _random
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from typing import Final, TypeVar

import aiohttp
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from exporter import USER_AGENT
from exporter.config import ApiSettings

__all__ = [
    "ApiError",
    "Attempt",
    "ErrorReason",
    "InvalidResponse",
    "Request",
    "Transport",
    "new_session",
    "parse_retry_after",
]

logger = logging.getLogger(__name__)

BACKOFF_BASE: Final = 1.0  # seconds
BACKOFF_CAP: Final = 60.0  # seconds
# A Retry-After of days would silently stop the exporter; an hour is already a long outage and
# the poller keeps reporting failures meanwhile.
RETRY_AFTER_CAP: Final = 3600.0
# Replies are a few counts or one page of at most 200 list items; anything near this size is a
# proxy page or a bug, not usage data.
MAX_BODY_BYTES: Final = 1 << 20
# A process-wide ceiling on sockets; the per-client limiter below is the real (reloadable) bound.
CONNECTOR_LIMIT: Final = 32
_SNIPPET_CHARS: Final = 200
_MESSAGE_CHARS: Final = 1000
# What an HTTP header value may carry; a key with a newline or space would be rejected by aiohttp
# with an error we do not control, or worse, split the header.
# A service user's token; anything else is a v2 personal key (config.py checks the pairing).
V3_TOKEN_PREFIX: Final = "cog_"
_HEADER_TOKEN: Final = re.compile(r"[\x21-\x7e]+")
_BEARER_TOKEN: Final = re.compile(r"(?i)(bearer\s+)\S+")
_HTML_TAG: Final = re.compile(r"<[^>]*>")
_WHITESPACE: Final = re.compile(r"\s+")


class ErrorReason(enum.StrEnum):
    """Why an attempt failed; the values are the `reason` label of devin_exporter_api_errors_total."""

    RATE_LIMITED = "rate_limited"
    SERVER_ERROR = "server_error"
    AUTH = "auth"
    CLIENT_ERROR = "client_error"
    TIMEOUT = "timeout"
    CONNECTION = "connection"
    INVALID_RESPONSE = "invalid_response"


# Transient by nature: waiting can fix them. The others mean the key, the config or the
# upstream contract is wrong, and asking again only burns rate limit.
RETRYABLE: Final = frozenset(
    {ErrorReason.RATE_LIMITED, ErrorReason.SERVER_ERROR, ErrorReason.TIMEOUT, ErrorReason.CONNECTION}
)


@dataclass(frozen=True)
class Request:
    """One GET to the API, as an endpoint declaration built it; the transport adds only the base URL
    and the credential."""

    path: str  # the upstream path from the endpoint declaration, path parameters already filled in
    params: tuple[tuple[str, str], ...] = ()  # pairs, so arrays repeat as FastAPI expects
    org_set: str | None = None  # who asks, for the API counters and logs; None: the enterprise
    collector: str = "usage"
    permission: str | None = None  # the v3 permission the endpoint needs, named when it answers 403


@dataclass(frozen=True)
class Attempt:
    """One HTTP attempt, reported to the observer (metrics use it)."""

    org_set: str | None  # None: an enterprise-level collector asked
    status: int | None  # HTTP status if a response arrived
    reason: ErrorReason | None  # None on success
    duration: float  # seconds, from the injected monotonic clock
    collector: str = "usage"


class ApiError(Exception):
    """The final failure of a fetch. Its text is ours, never aiohttp's, and never holds the key."""

    def __init__(
        self,
        reason: ErrorReason,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status
        self.message = message
        self.retry_after = retry_after

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return (
            f"ApiError(reason={self.reason.value!r}, status={self.status!r}, "
            f"message={self.message!r}, retry_after={self.retry_after!r})"
        )

    def __reduce__(self) -> tuple[Callable[..., ApiError], tuple[ErrorReason, str], dict[str, object]]:
        # The keyword-only arguments would be lost by Exception's default pickling.
        return (ApiError, (self.reason, self.message), {"status": self.status, "retry_after": self.retry_after})


class InvalidResponse(ValueError):
    """A 2xx reply that is not what the endpoint declares; raised by parse functions, and by the
    transport for a body that is not JSON. Its text names the field, never the field's input
    beyond a short scalar (an echoing proxy could put the key there)."""


T = TypeVar("T")


def parse_retry_after(value: str, now: float) -> float | None:
    """Seconds to wait from a Retry-After value (delta seconds or HTTP-date), relative to `now` (unix time).

    Capped at RETRY_AFTER_CAP; a date in the past means 0; negative, non-finite or unparsable means None.
    """
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = None
    if seconds is None:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            # RFC 9110 dates are GMT; "-0000" yields a naive datetime that means the same.
            when = when.replace(tzinfo=UTC)
        seconds = max(0.0, when.timestamp() - now)
    elif not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, RETRY_AFTER_CAP)


def new_session() -> aiohttp.ClientSession:
    """The one process-wide session. Call it from inside the running event loop; close it on shutdown.

    It does not read the environment itself (trust_env=False): aiohttp would then look up the
    proxy and ~/.netrc in a worker thread on every request, two thread hops per call, and a netrc
    entry for the API host would make every request fail next to our Authorization header.
    Transport resolves HTTP(S)_PROXY / NO_PROXY once per base URL instead (see env_proxy).
    """
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=CONNECTOR_LIMIT, ttl_dns_cache=300),
        # Nothing upstream needs cookies, and a jar would be state shared across org sets.
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
    )


def env_proxy(base_url: str) -> tuple[URL | None, aiohttp.BasicAuth | None]:
    """The HTTP(S)_PROXY for `base_url` unless NO_PROXY exempts its host, as aiohttp's trust_env
    picks it (exporters commonly sit behind an egress proxy); (None, None) for none."""
    try:
        return get_env_proxy_for_url(URL(base_url))
    except (LookupError, ValueError):
        return None, None


class _InFlightLimit:
    """A semaphore whose size can change at runtime (config reload), unlike asyncio.Semaphore.

    Slots are handed directly to the oldest waiter, so it is FIFO-fair and a shrink takes effect as
    in-flight requests finish.
    """

    def __init__(self, limit: int) -> None:
        self._limit = max(1, limit)
        self._in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def set_limit(self, limit: int) -> None:
        self._limit = max(1, limit)
        self._wake()

    async def acquire(self) -> None:
        if not self._waiters and self._in_flight < self._limit:
            self._in_flight += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed over just as we were cancelled: pass it on, or it leaks.
                self.release()
            raise

    def release(self) -> None:
        self._in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._in_flight < self._limit:
            waiter = self._waiters.popleft()
            if not waiter.done():  # skip waiters cancelled while queued
                self._in_flight += 1
                waiter.set_result(None)


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _snippet(body: bytes) -> str:
    """A short, single-line, tag-free excerpt of an error body (often a proxy's HTML page)."""
    text = body[: _SNIPPET_CHARS * 8].decode("utf-8", errors="replace")
    text = _WHITESPACE.sub(" ", _HTML_TAG.sub(" ", text)).strip()
    return _truncate(text, _SNIPPET_CHARS)


def _validation_details(detail: list[object]) -> str:
    """FastAPI's HTTPValidationError as `start_date: Input should be ...; end_date: ...`."""
    parts: list[str] = []
    for item in detail:
        if not isinstance(item, dict):
            continue
        loc = item.get("loc")
        msg = item.get("msg")
        where: list[str] = [str(p) for p in loc] if isinstance(loc, list) else []
        if len(where) > 1 and where[0] in ("query", "body", "path", "header", "cookie"):
            where = where[1:]  # "query" is noise; the parameter name is what an operator needs
        text = str(msg) if msg is not None else "invalid"
        parts.append(f"{'.'.join(where)}: {text}" if where else text)
    return "; ".join(parts)


def _describe_body(body: bytes) -> str:
    """What an error response says about itself, as briefly as it can be said: FastAPI's
    `{"detail": [...]}` or `{"detail": "..."}`, or RFC 9457 problem JSON (v3: `title`, `detail` a
    string, field errors in `errors`)."""
    if not body.strip():
        return ""
    try:
        document: object = json.loads(body)
    except (ValueError, RecursionError):
        return _snippet(body)
    if isinstance(document, dict):
        parts: list[str] = []
        detail = document.get("detail")
        if isinstance(detail, list):
            parts.append(_validation_details(detail))
        elif isinstance(detail, str):
            parts.append(_truncate(detail, _SNIPPET_CHARS))
        elif isinstance(document.get("title"), str):
            parts.append(_truncate(str(document["title"]), _SNIPPET_CHARS))
        errors = document.get("errors")
        if isinstance(errors, list):
            parts.append(_validation_details(errors))
        described = "; ".join(p for p in parts if p)
        if described:
            return described
    return _snippet(body)


def _decode_json(body: bytes) -> object:
    try:
        document: object = json.loads(body)
    except (ValueError, RecursionError):
        raise InvalidResponse(f"body is not JSON: {_snippet(body)!r}") from None
    return document


async def _read_limited(content: aiohttp.StreamReader, limit: int) -> tuple[bytes, bool]:
    """Up to `limit` bytes of the body, and whether there was more."""
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await content.read(limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    body = b"".join(chunks)
    return body[:limit], len(body) > limit


def _classify_status(status: int) -> ErrorReason | None:
    if 200 <= status < 300:
        return None
    if status == 429:
        return ErrorReason.RATE_LIMITED
    if 500 <= status < 600:
        return ErrorReason.SERVER_ERROR
    if status in (401, 403):
        return ErrorReason.AUTH
    # Other 4xx (422 = we sent something the API rejects), and 1xx/3xx we did not ask for.
    return ErrorReason.CLIENT_ERROR


def _status_text(status: int) -> str:
    try:
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


class Transport:
    """GETs from the Devin API; one instance per credential, shared by every collector, org set and window.

    All limits live on the instance because the upstream limit is per key: the in-flight bound,
    the request-rate spacing and the Retry-After pause apply to every caller together.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: ApiSettings,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        random: Callable[[], float] = _random.random,
        observer: Callable[[Attempt], None] | None = None,
    ) -> None:
        self._session = session
        self._settings = settings
        self._proxy = env_proxy(settings.base_url)
        self._monotonic = monotonic
        self._wall_clock = wall_clock
        self._sleep = sleep
        self._random = random
        self._observer = observer
        self._in_flight = _InFlightLimit(settings.max_concurrency)
        self._last_slot: float | None = None  # monotonic start time reserved by the latest request
        self._paused_until: float | None = None

    def __repr__(self) -> str:
        return f"Transport(base_url={self._settings.base_url!r})"

    @property
    def paused_until(self) -> float | None:
        """Monotonic time until which no request is sent (server asked via Retry-After), or None."""
        if self._paused_until is None or self._paused_until <= self._monotonic():
            return None
        return self._paused_until

    def update_settings(self, settings: ApiSettings) -> None:
        """Config reload: the new key, URL, timeout, retries and limits apply to later attempts."""
        self._settings = settings
        self._proxy = env_proxy(settings.base_url)
        self._in_flight.set_limit(settings.max_concurrency)

    async def get(self, request: Request, parse: Callable[[object], T]) -> T:
        """`parse` of the reply's JSON document; raises ApiError after the last failed attempt.

        `parse` raises InvalidResponse for a document the endpoint does not declare; that attempt
        then counts as `invalid_response` and is not retried.
        """
        retries = max(0, self._settings.retries)
        retry = 0
        while True:
            await self._acquire_send_permit()
            try:
                outcome = await self._attempt(request, parse, retry + 1)
            finally:
                self._in_flight.release()
            if not isinstance(outcome, ApiError):
                return outcome
            if outcome.reason not in RETRYABLE or retry >= retries:
                # Raised outside any `except` block, so no aiohttp exception (whose request_info
                # holds our headers) is chained to it; `from None` makes that explicit.
                raise outcome from None
            retry += 1
            delay = self._backoff(retry)
            if outcome.retry_after is not None:
                delay = max(delay, outcome.retry_after)
            logger.debug(
                "usage API retry scheduled",
                extra={
                    "org_set": request.org_set,
                    "collector": request.collector,
                    "retry": retry,
                    "reason": outcome.reason.value,
                    "delay_seconds": round(delay, 3),
                },
            )
            await self._sleep(delay)

    def _backoff(self, retry: int) -> float:
        """Full jitter: uniform(0, min(cap, base * 2**(retry-1))), retry counted from 1."""
        ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** min(retry - 1, 30))  # min(): no float overflow
        fraction = min(max(self._random(), 0.0), 1.0)
        return fraction * ceiling

    async def _acquire_send_permit(self) -> None:
        """Wait out any pause, take an in-flight slot, then a rate slot; leaves holding the slot."""
        while True:
            await self._wait_for_pause()
            await self._in_flight.acquire()
            try:
                await self._wait_for_rate_slot()
            except BaseException:
                self._in_flight.release()
                raise
            if self.paused_until is None:
                return
            # Another caller got a Retry-After while we waited for our slot: honour it too.
            self._in_flight.release()

    async def _wait_for_pause(self) -> None:
        while (until := self.paused_until) is not None:
            await self._sleep(until - self._monotonic())

    async def _wait_for_rate_slot(self) -> None:
        """Spacing, i.e. a token bucket of size 1: request starts are at least 1/rps apart.

        No burst allowance on purpose: the upstream limit is unknown, and evenly spaced requests
        are the least likely to trip it. The slot is reserved before sleeping, so concurrent
        callers line up without a lock.
        """
        rps = self._settings.requests_per_second  # with --shard: this replica's share
        if not (rps > 0 and math.isfinite(rps)):
            return  # config validation forbids this; treat as "no rate limit" rather than crash
        now = self._monotonic()
        slot = now if self._last_slot is None else max(now, self._last_slot + 1.0 / rps)
        self._last_slot = slot
        if slot > now:
            await self._sleep(slot - now)

    def _pause(self, seconds: float) -> None:
        until = self._monotonic() + seconds
        if self._paused_until is None or until > self._paused_until:
            self._paused_until = until
        if seconds > 0:
            logger.info("usage API asked to back off; pausing all requests", extra={"pause_seconds": round(seconds, 3)})

    def _error(
        self, reason: ErrorReason, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> ApiError:
        # Belt and braces: the message is built from our own words plus server/aiohttp text, and a
        # misbehaving proxy may echo request headers in its body. Scrub the key from all of it.
        return ApiError(reason, _truncate(self._scrub(message), _MESSAGE_CHARS), status=status,
                        retry_after=retry_after)

    def _scrub(self, text: str) -> str:
        """The text without the key or any bearer token; call it before cutting text short, since a
        key cut in half is no longer recognisable."""
        key = self._settings.api_key.reveal()
        text = _BEARER_TOKEN.sub(r"\1***", text)
        return text.replace(key, "***") if key else text

    async def _attempt(self, request: Request, parse: Callable[[object], T], number: int) -> T | ApiError:
        settings = self._settings
        started = self._monotonic()
        status: int | None = None
        outcome: T | ApiError
        key = settings.api_key.reveal()
        if not _HEADER_TOKEN.fullmatch(key):
            outcome = self._error(
                ErrorReason.AUTH,
                "the API key is empty or contains whitespace/non-ASCII characters and cannot be sent; "
                "check api.api_key",
            )
        else:
            url = settings.base_url.rstrip("/") + request.path
            headers = {
                "Authorization": f"Bearer {key}",
                "User-Agent": USER_AGENT,
                "Accept": "application/json",
            }
            try:
                async with self._session.get(
                    url,
                    params=list(request.params),
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=settings.timeout),
                    # A redirect would carry the bearer token to wherever Location points.
                    allow_redirects=False,
                    proxy=self._proxy[0],
                    proxy_auth=self._proxy[1],
                ) as response:
                    status = response.status
                    retry_after = self._honour_retry_after(status, response.headers.get("Retry-After"))
                    body, truncated = await _read_limited(response.content, MAX_BODY_BYTES)
                    outcome = self._interpret(request, parse, status, body, truncated, retry_after,
                                              response.headers.get("Location"))
            except TimeoutError:
                # Before ClientError: aiohttp's ServerTimeoutError is both, and it is a timeout.
                outcome = self._error(
                    ErrorReason.TIMEOUT,
                    f"no complete response within {settings.timeout:g}s"
                    + (f" (after {_status_text(status)})" if status else ""),
                    status=status,
                )
            except aiohttp.ClientError as exc:
                # Our own words plus the exception's str(); never its repr, which holds request_info.
                detail = _truncate(self._scrub(str(exc)), _SNIPPET_CHARS)
                outcome = self._error(
                    ErrorReason.CONNECTION,
                    f"connection failed: {type(exc).__name__}" + (f": {detail}" if detail else ""),
                    status=status,
                )
        duration = max(0.0, self._monotonic() - started)
        reason = outcome.reason if isinstance(outcome, ApiError) else None
        logger.debug(
            "usage API attempt",
            extra={
                "org_set": request.org_set,
                "collector": request.collector,
                "path": request.path,
                "attempt": number,
                "status": status,
                "reason": reason.value if reason else None,
                "duration_seconds": round(duration, 3),
            },
        )
        self._observe(Attempt(request.org_set, status, reason, duration, request.collector))
        return outcome

    def _honour_retry_after(self, status: int, header: str | None) -> float | None:
        """Parse Retry-After on 429/5xx, and pause the whole client for it: the limit is per key."""
        if header is None or _classify_status(status) not in (ErrorReason.RATE_LIMITED, ErrorReason.SERVER_ERROR):
            return None
        seconds = parse_retry_after(header, self._wall_clock())
        if seconds is not None:
            self._pause(seconds)
        return seconds

    def _interpret(
        self, request: Request, parse: Callable[[object], T], status: int, body: bytes, truncated: bool,
        retry_after: float | None, location: str | None,
    ) -> T | ApiError:
        # Scrub the key before any text is cut short: _error's scrub cannot recognise a key that
        # truncation cut in half (`apk_user_AB12…`), and that first half would reach the log. On a
        # good reply this also keeps an echoed key from becoming an extra field's metric name.
        # (Only keys of a real key's length: scrubbing a one-letter test key would mangle the JSON.)
        key = self._settings.api_key.reveal()
        if len(key) >= 8:
            body = body.replace(key.encode(), b"***")
            location = location.replace(key, "***") if location else location
        reason = _classify_status(status)
        if reason is None:
            if truncated:
                return self._error(
                    ErrorReason.INVALID_RESPONSE,
                    f"{_status_text(status)} with a body over {MAX_BODY_BYTES} bytes",
                    status=status,
                )
            try:
                return parse(_decode_json(body))
            except InvalidResponse as exc:
                return self._error(ErrorReason.INVALID_RESPONSE, f"{_status_text(status)} but {exc}", status=status)
        parts = [_status_text(status)]
        if reason is ErrorReason.AUTH:
            parts.append(self._auth_problem(request, status))
        elif 300 <= status < 400:
            where = _truncate(location, _SNIPPET_CHARS) if location else "nowhere"
            parts.append(f"redirect to {where} not followed (it would carry the API key); check api.base_url")
        elif status == 422:
            parts.append("the API rejected the request parameters")
        if retry_after is not None:
            parts.append(f"Retry-After {retry_after:g}s")
        described = _describe_body(body)
        if described:
            parts.append(described)
        message = parts[0] if len(parts) == 1 else f"{parts[0]}: {'; '.join(parts[1:])}"
        return self._error(reason, message, status=status, retry_after=retry_after)

    def _auth_problem(self, request: Request, status: int) -> str:
        """What a 401/403 means for this credential, in words an operator can act on."""
        v3 = self._settings.api_key.reveal().startswith(V3_TOKEN_PREFIX)
        if status == 403 and v3:
            # v3 is role-based: a 403 is a missing permission of the service user, not a bad token,
            # and only this collector's endpoints are affected.
            needs = f" {request.permission}" if request.permission else " for this endpoint"
            return (f"the service user lacks a permission: collector {request.collector} needs{needs} "
                    "(Enterprise settings > Service users > role)")
        if v3:
            return "the service user token was rejected (it must be a v3 service user token, cog_…)"
        return "the API key was rejected (it must be an enterprise-admin personal API key, apk_user_…)"

    def _observe(self, attempt: Attempt) -> None:
        if self._observer is None:
            return
        try:
            self._observer(attempt)
        except Exception:
            # Metrics bookkeeping must not turn a good reply into a failed poll.
            logger.exception("usage API observer failed")
