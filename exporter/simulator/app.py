"""The simulator's aiohttp app: request log, faults, token check, rate limit and the `/-/` control plane."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hmac
import http
import json
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, TypedDict, Unpack, cast

from aiohttp import web
from aiohttp.typedefs import Handler

from exporter.simulator import v2, v3
from exporter.simulator.faults import Faults, malformed_body
from exporter.simulator.model import DEFAULT_ORGANIZATIONS, Organization, as_utc, created_at
from exporter.simulator.route import Call, ErrorEntry, Invalid, JSONValue, NotFound, Route

__all__ = [
    "DEFAULT_DEMO_KEY",
    "DEFAULT_V3_TOKEN",
    "FAULTS_KEY",
    "ORGANIZATIONS_KEY",
    "REQUESTS_KEY",
    "V3_TOKEN_PREFIX",
    "CreateAppOptions",
    "RecordedRequest",
    "create_app",
    "start_simulator",
    "url",
]

DEFAULT_DEMO_KEY: Final = "apk_user_simulator"
DEFAULT_V3_TOKEN: Final = "cog_simulator"
# Every v3 credential has this prefix; v2 takes none of them, v3 nothing else.
V3_TOKEN_PREFIX: Final = "cog_"

# Bounded so a long-running demo does not grow without limit; tests look at far fewer.
_MAX_RECORDED_REQUESTS: Final = 10_000
_LOGIN_PATH: Final = "/login"


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
    v3_token: str | None
    clock: Callable[[], datetime]
    rng: random.Random
    page_size: int
    shutdown: asyncio.Event = field(default_factory=asyncio.Event)
    buckets: dict[str, _TokenBucket] = field(default_factory=dict)


FAULTS_KEY: Final = web.AppKey("simulator_faults", Faults)
REQUESTS_KEY: Final = web.AppKey("simulator_requests", collections.deque[RecordedRequest])
# The enterprise's organizations, in listing order; tests may change the list in place.
ORGANIZATIONS_KEY: Final = web.AppKey("simulator_organizations", list[Organization])
_STATE_KEY: Final = web.AppKey("simulator_state", _State)


def _utc_now() -> datetime:
    return datetime.now(UTC)


# --------------------------------------------------------------------------------------------
# Error replies
# --------------------------------------------------------------------------------------------


def _on_v3(request: web.Request) -> bool:
    return request.path.startswith("/v3/")


def _detail(status: int, detail: JSONValue, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"detail": detail}, status=status, headers=headers)


def _problem(
    status: int,
    detail: str,
    instance: str,
    headers: Mapping[str, str] | None = None,
    errors: list[ErrorEntry] | None = None,
) -> web.Response:
    """An RFC 9457 problem, as v3 answers errors; `errors` only on a 422."""
    body: dict[str, JSONValue] = {
        "type": "about:blank",
        "title": http.HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "instance": instance,
        "errors": None if errors is None else list[JSONValue](errors),
    }
    return web.json_response(body, status=status, headers=headers, content_type="application/problem+json")


def _error(request: web.Request, status: int, detail: str, headers: Mapping[str, str] | None = None) -> web.Response:
    """An error reply in the shape of the request's API version: problem JSON on v3, FastAPI's on v2."""
    if _on_v3(request):
        return _problem(status, detail, request.path, headers, errors=[] if status == 422 else None)
    return _detail(status, detail, headers)


def _where(entry: ErrorEntry) -> str:
    """An error entry's `loc` as `query.time_after`."""
    loc = entry.get("loc")
    return ".".join(str(part) for part in loc) if isinstance(loc, list) else "request"


def _unprocessable(request: web.Request, errors: list[ErrorEntry]) -> web.Response:
    if _on_v3(request):
        # v3 keeps `detail` a string (the legacy list moved to `errors`).
        summary = "; ".join(f"{_where(e)}: {e['msg']}" for e in errors)
        return _problem(422, summary, request.path, errors=errors)
    return _detail(422, list[JSONValue](errors))


def _html_error(status: int) -> web.Response:
    phrase = http.HTTPStatus(status).phrase
    return web.Response(
        status=status,
        text=f"<html><body><h1>{status} {phrase}</h1></body></html>",
        content_type="text/html",
    )


def _unauthorized(request: web.Request, detail: str | None = None) -> web.Response:
    """A 401 with the bearer challenge; by default the detail of a token this path does not take."""
    if detail is None:
        detail = "Invalid token" if _on_v3(request) else "Invalid API key"
    return _error(request, 401, detail, {"WWW-Authenticate": "Bearer"})


def _fault_status_response(request: web.Request, status: int, retry_after: str | None) -> web.Response:
    if status == 429:
        headers = {"Retry-After": retry_after} if retry_after is not None else None
        return _error(request, 429, "Too Many Requests", headers)
    if status >= 500:
        # What a load balancer in front of the API sends, not FastAPI: HTML, not JSON.
        return _html_error(status)
    if status == 401:
        return _unauthorized(request)
    if status == 403:
        if not _on_v3(request):
            return _detail(403, "Enterprise admin API key required")
        needed = v3.permission(request.path)
        if needed is not None:
            return _error(request, 403, f"The service user lacks the {needed} permission")
    return _error(request, status, http.HTTPStatus(status).phrase)


# --------------------------------------------------------------------------------------------
# Middleware and the API routes' shared front
# --------------------------------------------------------------------------------------------


def _query(request: web.Request) -> dict[str, list[str]]:
    query: dict[str, list[str]] = {}
    for key, value in request.query.items():
        query.setdefault(key, []).append(value)
    return query


@web.middleware
async def _record_and_shape_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Record API traffic; answer routing errors as the API would (JSON per version), not as text."""
    record: RecordedRequest | None = None
    # The control plane is not traffic under test, and /-/requests would otherwise list itself.
    if not request.path.startswith("/-/"):
        record = RecordedRequest(
            time=request.app[_STATE_KEY].clock(),
            method=request.method,
            path=request.path,
            query=_query(request),
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
        response = _error(request, exc.status, exc.reason, allow)
    if record is not None:
        record.status = response.status
    return response


def _check_token(request: web.Request, state: _State) -> web.Response | None:
    """401 unless the bearer token is the one this path's API version takes.

    v3 paths take service-user tokens (`cog_`), v2 paths personal API keys: a token of the other
    family is refused even when the app accepts any token (`api_key` / `v3_token` None).
    """
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return _unauthorized(request, "Not authenticated")
    v3 = _on_v3(request)
    expected = state.v3_token if v3 else state.api_key
    if token.startswith(V3_TOKEN_PREFIX) != v3 or (
        expected is not None and not hmac.compare_digest(token.encode(), expected.encode())
    ):
        return _unauthorized(request)
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
    return _error(request, 429, "Too Many Requests", {"Retry-After": str(max(1, math.ceil(wait)))})


async def _fault_response(request: web.Request, state: _State, faults: Faults) -> web.Response | None:
    """What the faults answer instead of the API, or None to let the request through."""
    if faults.latency > 0:
        # Wake early on shutdown so a slow simulator never holds up a clean stop.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.shutdown.wait(), faults.latency)
    if faults.hang:
        await state.shutdown.wait()
        return _error(request, 503, "Simulator shutting down")
    if faults.redirect:
        return web.Response(status=302, headers={"Location": _LOGIN_PATH})
    if faults.status is not None:
        return _fault_status_response(request, faults.status, faults.retry_after)
    # Draw for every request the faults apply to, so the n-th one's fate depends only on the seed.
    if state.rng.random() < faults.error_rate:
        return _html_error(500)
    return None


def _api(route: Route) -> Handler:
    """The aiohttp handler of an API route: faults, then the token check, the rate limit, the route."""

    async def handle(request: web.Request) -> web.StreamResponse:
        state = request.app[_STATE_KEY]
        faults = request.app[FAULTS_KEY]
        scoped = faults.applies_to(request.path)
        refused = await _fault_response(request, state, faults) if scoped else None
        # Not `or`: a Response is a MutableMapping, and an empty one is falsy.
        if refused is None:
            refused = _check_token(request, state)
        if refused is None:
            refused = _rate_limited(request, state, faults)
        if refused is not None:
            return refused
        organizations: list[Organization] = request.app[ORGANIZATIONS_KEY]
        call = Call(
            path=request.path,
            query=_query(request),
            params=dict(request.match_info),
            now=state.clock(),
            organizations=tuple(organizations),
            page_size=state.page_size,
            runaway_cursor=faults.runaway_cursor,
        )
        try:
            reply = route.handler(call)
        except Invalid as exc:
            return _unprocessable(request, exc.errors)
        except NotFound as exc:
            return _error(request, 404, str(exc))
        if scoped and faults.malformed is not None:
            return web.Response(body=malformed_body(faults.malformed, reply), content_type="application/json")
        return web.json_response(reply.body)

    return handle


# --------------------------------------------------------------------------------------------
# The control plane and the login page
# --------------------------------------------------------------------------------------------


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


_ORGANIZATION_FIELDS: Final = ("org_id", "name", "max_cycle_acu_limit", "max_session_acu_limit")


def _organization_json(org: Organization) -> dict[str, JSONValue]:
    return {name: cast(JSONValue, getattr(org, name)) for name in _ORGANIZATION_FIELDS}


def _read_organization(entry: object, where: str) -> Organization:
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be an object")
    fields = cast(dict[str, object], entry)
    unknown = sorted(set(fields) - set(_ORGANIZATION_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(_ORGANIZATION_FIELDS)}")
    org_id, name = fields.get("org_id"), fields.get("name")
    for key, text in (("org_id", org_id), ("name", name)):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}.{key} must be a non-empty string")
    cycle, session = fields.get("max_cycle_acu_limit"), fields.get("max_session_acu_limit")
    for key, limit in (("max_cycle_acu_limit", cycle), ("max_session_acu_limit", session)):
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ValueError(f"{where}.{key} must be null or an integer >= 0")
    return Organization(cast(str, org_id), cast(str, name), cast(int | None, cycle), cast(int | None, session))


def _read_organizations(body: object, current: Sequence[Organization], now: datetime) -> list[Organization]:
    """The list a PUT /-/organizations asks for; raises ValueError naming the first bad entry.

    An org new to the list is created now; one whose name or limits change is updated now; the
    others keep their timestamps.
    """
    if not isinstance(body, list):
        raise ValueError("body must be a JSON list of organizations")
    known = {org.org_id: org for org in current}
    now = as_utc(now).replace(microsecond=0)
    result: dict[str, Organization] = {}
    for i, entry in enumerate(cast(list[object], body)):
        org = _read_organization(entry, f"organizations[{i}]")
        if org.org_id in result:
            raise ValueError(f"organizations[{i}].org_id {org.org_id!r} is listed twice")
        before = known.get(org.org_id)
        if before is None:
            org = dataclasses.replace(org, created_at=now, updated_at=now)
        elif _organization_json(before) == _organization_json(org):
            org = before
        else:
            org = dataclasses.replace(org, created_at=created_at(before), updated_at=now)
        result[org.org_id] = org
    return list(result.values())


async def _get_organizations(request: web.Request) -> web.StreamResponse:
    return web.json_response([_organization_json(org) for org in request.app[ORGANIZATIONS_KEY]])


async def _put_organizations(request: web.Request) -> web.StreamResponse:
    try:
        body: object = await request.json()
    except json.JSONDecodeError as exc:
        return _detail(400, f"body is not JSON: {exc}")
    organizations = request.app[ORGANIZATIONS_KEY]
    try:
        organizations[:] = _read_organizations(body, organizations, request.app[_STATE_KEY].clock())
    except ValueError as exc:
        return _detail(400, str(exc))
    return await _get_organizations(request)


async def _release_hung_requests(app: web.Application) -> None:
    # on_shutdown runs before the runner waits for in-flight handlers, so hung ones end now.
    app[_STATE_KEY].shutdown.set()


def create_app(
    *,
    api_key: str | None = DEFAULT_DEMO_KEY,
    v3_token: str | None = DEFAULT_V3_TOKEN,
    faults: Faults | None = None,
    clock: Callable[[], datetime] | None = None,
    seed: int = 0,
    organizations: Sequence[Organization] = DEFAULT_ORGANIZATIONS,
    page_size: int = 2,
) -> web.Application:
    """The simulator as an aiohttp app.

    `api_key` is the bearer token /v2 paths take, `v3_token` the one /v3 paths take (a `cog_`
    token). `api_key=None` accepts any token but a `cog_` one, `v3_token=None` any `cog_` token;
    the header is always required. `clock` returns the current time (aware, or naive meaning
    UTC) for every number, rate limiting and records. `seed` makes `error_rate` reproducible.
    `organizations` is the enterprise's initial list (ORGANIZATIONS_KEY holds it, `/-/organizations`
    changes it). `page_size` caps the items of a list page below what a client asks for, so a
    client must really follow the pages. Raises ValueError for an `api_key` of the v3 family, a
    `v3_token` outside it, or a `page_size` below 1.
    """
    if page_size < 1:
        raise ValueError("page_size must be at least 1")
    if api_key is not None and api_key.startswith(V3_TOKEN_PREFIX):
        raise ValueError(f"api_key is for /v2 paths, which refuse {V3_TOKEN_PREFIX} tokens")
    if v3_token is not None and not v3_token.startswith(V3_TOKEN_PREFIX):
        raise ValueError(f"v3_token must start with {V3_TOKEN_PREFIX}")
    app = web.Application(middlewares=[_record_and_shape_errors])
    app[FAULTS_KEY] = faults if faults is not None else Faults()
    app[REQUESTS_KEY] = collections.deque(maxlen=_MAX_RECORDED_REQUESTS)
    app[ORGANIZATIONS_KEY] = list(organizations)
    app[_STATE_KEY] = _State(
        api_key=api_key, v3_token=v3_token, clock=clock or _utc_now, rng=random.Random(seed), page_size=page_size
    )
    for route in (*v2.ROUTES, *v3.ROUTES):
        app.router.add_get(route.path, _api(route))
    app.router.add_get(_LOGIN_PATH, _login)
    app.router.add_get("/-/faults", _get_faults)
    app.router.add_post("/-/faults", _post_faults)
    app.router.add_delete("/-/faults", _delete_faults)
    app.router.add_get("/-/requests", _get_requests)
    app.router.add_delete("/-/requests", _delete_requests)
    app.router.add_get("/-/organizations", _get_organizations)
    app.router.add_put("/-/organizations", _put_organizations)
    app.on_shutdown.append(_release_hung_requests)
    return app


# --------------------------------------------------------------------------------------------
# Serving it
# --------------------------------------------------------------------------------------------


class CreateAppOptions(TypedDict, total=False):
    """Keyword arguments of create_app, for start_simulator."""

    api_key: str | None
    v3_token: str | None
    faults: Faults | None
    clock: Callable[[], datetime] | None
    seed: int
    organizations: Sequence[Organization]
    page_size: int


# Hung and slow handlers are released on shutdown, so this only bounds the unexpected.
_SHUTDOWN_TIMEOUT: Final = 2.0


def url(host: str, port: int) -> str:
    """The base URL of host:port, with an IPv6 host in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def start_simulator(
    host: str = "127.0.0.1", port: int = 0, **create_app_kwargs: Unpack[CreateAppOptions]
) -> tuple[web.AppRunner, str]:
    """Serve the simulator on host:port (0 picks a free port); returns the runner and base URL.

    Stop it with `await runner.cleanup()`.
    """
    runner = web.AppRunner(create_app(**create_app_kwargs), access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = int(runner.addresses[0][1])  # the real port when 0 was asked for
    return runner, url(host, bound_port)
