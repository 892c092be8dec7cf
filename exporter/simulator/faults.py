"""Switchable misbehaviour of the simulated API, and the broken bodies of the `malformed` fault."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Final, Literal, cast, get_args

from exporter.simulator.route import JSONPath, JSONValue, Reply

__all__ = ["MALFORMED_KINDS", "Faults", "MalformedKind", "malformed_body"]

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
    """Switchable misbehaviour of the simulated endpoint; everything is off by default.

    Mutate it in place (tests hold the same object the app uses) or POST to `/-/faults`.
    Faults apply only to the API's routes, never to the `/-/` control plane.
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


def _truncated(body: JSONValue) -> str:
    """The reply cut off after its first member, as a dropped connection would leave it."""
    if isinstance(body, dict):
        first = next(iter(body), "")
        return "{" + json.dumps(first) + ": 1,"
    if isinstance(body, list):
        return "[" + (_truncated(body[0]) if body else "")
    return json.dumps(body)[:-1]


def _retyped(value: JSONValue) -> JSONValue:
    """Every number as a string, as a proxy that formats numbers would send them."""
    if isinstance(value, dict):
        return {k: _retyped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_retyped(v) for v in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


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


def malformed_body(kind: str, reply: Reply) -> bytes:
    """The body a `malformed` fault of this kind sends instead of the reply, as a 200.

    json: cut off after its first member; empty: nothing; types: numbers as strings; negative /
    huge: the reply's lead number made -1 / 2**64; missing: a required field left out; array: an
    object reply inside a list.
    """
    if kind == "json":
        return _truncated(reply.body).encode()
    if kind == "empty":
        return b""
    body: JSONValue
    if kind == "types":
        body = _retyped(reply.body)
    elif kind == "negative":
        body = _with(reply.body, reply.lead, -1)
    elif kind == "huge":
        body = _with(reply.body, reply.lead, 2**64)
    elif kind == "missing":
        body = _with(reply.body, reply.required, None, drop=True)
    else:  # "array"
        body = [reply.body]
    return json.dumps(body).encode()
