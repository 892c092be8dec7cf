"""Switchable misbehaviour of the simulated API, and the broken bodies of the `malformed` fault."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Final, Literal, cast, get_args

from exporter.simulator.route import JSONPath, JSONValue, Reply

__all__ = ["MALFORMED_KINDS", "Faults", "MalformedKind", "malformed_body"]

# What each kind sends instead of a reply, for every reply shape (see `malformed_body`).
MalformedKind = Literal["json", "types", "negative", "huge", "missing", "empty", "array"]
MALFORMED_KINDS: Final[tuple[str, ...]] = get_args(MalformedKind)


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
    """Switchable misbehaviour of the simulated API; everything is off by default.

    Mutate it in place (tests hold the same object the app uses) or POST to `/-/faults`. Faults
    apply to every API route of both versions, never to the `/-/` control plane; `paths`
    narrows the ones that answer instead of the API (status, malformed, hang, latency,
    error_rate, redirect) to request paths under one of its prefixes, while
    rate_limit_per_second and runaway_cursor always apply everywhere.
    """

    latency: float = 0.0  # seconds added before every answer
    error_rate: float = 0.0  # share of requests answered 500 with an HTML body (seeded RNG)
    status: int | None = None  # answer every request with this status (400-599)
    retry_after: str | None = "1"  # Retry-After sent with fault 429s; None sends no header
    malformed: MalformedKind | None = None  # a broken 200 body, see MALFORMED_KINDS
    hang: bool = False  # never answer (released on app shutdown)
    redirect: bool = False  # 302 to a login page, as an SSO proxy in the path would
    rate_limit_per_second: float | None = None  # token bucket per API key; 429 when empty
    paths: list[str] | None = None  # path prefixes the faults above apply to; None: all
    runaway_cursor: bool = False  # list pages always say there is a next page, with a new cursor

    def __post_init__(self) -> None:
        self._validate(self.to_json())

    def to_json(self) -> dict[str, JSONValue]:
        values = {f.name: cast(JSONValue, getattr(self, f.name)) for f in fields(self)}
        if self.paths is not None:
            values["paths"] = list[JSONValue](self.paths)
        return values

    def applies_to(self, path: str) -> bool:
        """Whether the faults that answer instead of the API apply to this request path."""
        return self.paths is None or path.startswith(tuple(self.paths))

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
            elif name == "paths" and value is not None:
                value = list(cast(list[str], value))
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
        for flag in ("hang", "redirect", "runaway_cursor"):
            if not isinstance(values[flag], bool):
                raise ValueError(f"{flag} must be true or false")
        rate = values["rate_limit_per_second"]
        if rate is not None and _check_number("rate_limit_per_second", rate, low=0.0) <= 0:
            raise ValueError("rate_limit_per_second must be > 0 or null")
        paths = values["paths"]
        if paths is not None and not (
            isinstance(paths, list) and all(isinstance(p, str) and p.startswith("/") for p in cast(list[object], paths))
        ):
            raise ValueError("paths must be null or a list of path prefixes, each starting with /")


def _truncated(body: JSONValue) -> str:
    """The reply cut off after its first member, as a dropped connection would leave it."""
    if isinstance(body, dict):
        first = next(iter(body), "")
        return "{" + json.dumps(first) + ": 1,"
    if isinstance(body, list):
        return "[" + (_truncated(body[0]) if body else "")
    return json.dumps(body)[:-1]


# The date-times replies carry (v2 writes them so): the `types` fault turns them into numbers.
_DATE_TIME_RE: Final = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z", re.ASCII)


def _retyped(value: JSONValue) -> JSONValue:
    """Every leaf as the wrong JSON type, as a proxy that reformats values would send them.

    Integers become their digits as a string ("127"); fractions a string with a decimal comma
    ("12,5"), which no number parser takes, since clients may accept ACUs as numeric strings;
    booleans "true"/"false"; date-times Unix seconds. Other strings and nulls stay.
    """
    if isinstance(value, dict):
        return {k: _retyped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_retyped(v) for v in value]
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value).replace(".", ",")
    if isinstance(value, str) and _DATE_TIME_RE.fullmatch(value):
        return int(datetime.strptime(value + "+0000", "%Y-%m-%dT%H:%M:%SZ%z").timestamp())
    return value


def _out_of_range(value: JSONValue, *, negative: bool) -> JSONValue:
    """The `negative` / `huge` replacement of a lead value: -1 or 2**64 for a number, and for a
    date-time one second before the Unix epoch or a year no RFC 3339 parser takes."""
    if isinstance(value, str):
        return "1969-12-31T23:59:59Z" if negative else "10000-01-01T00:00:00Z"
    return -1 if negative else 2**64


def _with(body: JSONValue, path: JSONPath, value: JSONValue, *, drop: bool = False) -> JSONValue:
    """`body` with the leaf at `path` replaced by `value` (or dropped); as it was if there is none."""
    if not path:
        return body
    key, rest = path[0], path[1:]
    if isinstance(body, dict) and isinstance(key, str) and key in body:
        members = dict(body)
        if rest:
            members[key] = _with(body[key], rest, value, drop=drop)
        elif drop:
            del members[key]
        else:
            members[key] = value
        return members
    if isinstance(body, list) and isinstance(key, int) and -len(body) <= key < len(body):
        items = list(body)
        if rest:
            items[key] = _with(body[key], rest, value, drop=drop)
        elif drop:
            del items[key]
        else:
            items[key] = value
        return items
    return body


def _leaf(body: JSONValue, path: JSONPath) -> JSONValue:
    for key in path:
        if isinstance(body, dict) and isinstance(key, str):
            body = body.get(key)
        elif isinstance(body, list) and isinstance(key, int) and -len(body) <= key < len(body):
            body = body[key]
        else:
            return None
    return body


def malformed_body(kind: str, reply: Reply) -> bytes:
    """The body a `malformed` fault of this kind sends instead of the reply, as a 200.

    json: cut off after its first member; empty: nothing; types: every leaf of the wrong type
    (see `_retyped`); negative / huge: the reply's lead value (a count, a limit, a timestamp)
    made -1 / 2**64, or out of range for a date-time; missing: a required field left out;
    array: the reply in the other container, an object in a list or a list in an object.
    """
    if kind == "json":
        return _truncated(reply.body).encode()
    if kind == "empty":
        return b""
    body: JSONValue
    if kind == "types":
        body = _retyped(reply.body)
    elif kind in ("negative", "huge"):
        body = _with(reply.body, reply.lead, _out_of_range(_leaf(reply.body, reply.lead), negative=kind == "negative"))
    elif kind == "missing":
        body = _with(reply.body, reply.required, None, drop=True)
    else:  # "array"
        body = {"items": reply.body} if isinstance(reply.body, list) else [reply.body]
    return json.dumps(body).encode()
