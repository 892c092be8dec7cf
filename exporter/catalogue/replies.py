"""The field kinds reply schemas are declared with: each checks one JSON value and says what is wrong.

A reply schema is a mapping of field name to kind (see `fields`); a value that does not fit its
kind makes the whole reply `invalid_response`. The messages name the field and show at most a
short scalar of the input, never a container (an echoing proxy could put the key in one).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Final

from exporter.config import IDENTIFIER_RE
from exporter.transport import InvalidResponse

# Prometheus sample values are float64: above 2**53 an integer count can no longer be told
# apart from its neighbours, so such a reply is wrong for our purpose, not merely big.
MAX_EXACT_INT: Final = 2**53

Kind = Callable[[str, object], object]  # (field name, value) -> the checked value, or InvalidResponse


def describe(value: object) -> str:
    # Scalars are shown; containers only by type, since their text could be large or deep.
    if value is None or isinstance(value, (bool, int, float, str)):
        text = json.dumps(value)
        return text if len(text) <= 40 else text[:39] + "…"
    return "an array" if isinstance(value, list) else "an object"


def count(name: str, value: object) -> int:
    """A non-negative integer count up to 2**53; `true` and `1.0` are not counts."""
    if type(value) is int and 0 <= value <= MAX_EXACT_INT:  # the usual case in one test (type(True) is bool)
        return value
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidResponse(f"field {name!r} is {describe(value)}, not an integer")
    if value < 0:
        raise InvalidResponse(f"field {name!r} is negative ({value})")
    if value > MAX_EXACT_INT:
        raise InvalidResponse(f"field {name!r} is {value}, above 2**53 (not exact as a float)")
    return value


def amount(name: str, value: object) -> float:
    """A non-negative finite number (ACUs are fractional); a string holding one is accepted."""
    # The usual case first: a v3 consumption reply has a hundred of these per window. NaN fails
    # the comparison and takes the long way, which rejects it.
    if (type(value) is float or type(value) is int) and 0 <= value < math.inf:
        return float(value)
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        raise InvalidResponse(f"field {name!r} is {describe(value)}, not a number")
    if number < 0:
        raise InvalidResponse(f"field {name!r} is negative ({describe(value)})")
    return number


def text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidResponse(f"field {name!r} is {describe(value)}, not a string")
    return value


def unix_time(name: str, value: object) -> int:
    """Unix seconds, as v3 sends times."""
    return count(name, value)


def rfc3339(name: str, value: object) -> float:
    """An RFC 3339 date-time, as v2 sends times, as Unix seconds (naive means UTC)."""
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    raise InvalidResponse(f"field {name!r} is {describe(value)}, not an RFC 3339 date-time")


def optional(kind: Kind) -> Kind:
    """The kind, or null."""
    def check(name: str, value: object) -> object:
        return None if value is None else kind(name, value)
    return check


def count_map(name: str, value: object) -> dict[str, int]:
    """An object of counts keyed by a label value (`sessions_created_by_origin`)."""
    if not isinstance(value, dict):
        raise InvalidResponse(f"field {name!r} is {describe(value)}, not an object")
    return {str(key): count(f"{name}.{key}", item) for key, item in value.items()}


def amount_map(name: str, value: object) -> dict[str, float]:
    if not isinstance(value, dict):
        raise InvalidResponse(f"field {name!r} is {describe(value)}, not an object")
    return {str(key): amount(f"{name}.{key}", item) for key, item in value.items()}


def array_of(read_item: Callable[[object], dict[str, object]], what: str) -> Kind:
    """A JSON array whose every item is read by `read_item` (v3 consumption's days)."""
    def check(name: str, value: object) -> list[dict[str, object]]:
        return [read_item(item) for item in array(value, f"field {name!r}")]
    return check


def obj(document: object, what: str = "body") -> Mapping[str, object]:
    if not isinstance(document, dict):
        raise InvalidResponse(f"{what} is JSON {type(document).__name__}, not an object")
    return document


def array(document: object, what: str = "body") -> list[object]:
    if not isinstance(document, list):
        raise InvalidResponse(f"{what} is JSON {type(document).__name__}, not an array")
    return document


def fields(document: object, schema: Mapping[str, Kind], *, optional_fields: Iterable[str] = (),
           what: str = "body") -> dict[str, object]:
    """The schema's fields of a JSON object, each checked by its kind; a missing required one is an error."""
    reply = obj(document, what)
    skip = set(optional_fields)
    out: dict[str, object] = {}
    for name, kind in schema.items():
        if name not in reply:
            if name in skip:
                continue
            raise InvalidResponse(f"field {name!r} is missing")
        out[name] = kind(name, reply[name])
    return out


def numeric_extras(document: Mapping[str, object], known: Iterable[str]) -> dict[str, float]:
    """Numeric fields beyond the declared ones whose names are valid metric name parts.

    Extras are a bonus: anything that is not a plain non-negative number is ignored, not an error.
    """
    declared = set(known)
    extras: dict[str, float] = {}
    for name, value in document.items():
        if name in declared or not isinstance(name, str) or not IDENTIFIER_RE.fullmatch(name):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, int):
            if 0 <= value <= MAX_EXACT_INT:
                extras[name] = value
        elif math.isfinite(value) and value >= 0:
            extras[name] = value
    return extras
