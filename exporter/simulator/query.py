"""Query values read and refused as FastAPI (pydantic v2) would: datetimes, integers, 422 entries."""

from __future__ import annotations

import calendar
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Final

from exporter.simulator.model import EPOCH, as_utc
from exporter.simulator.route import ErrorEntry, Invalid, JSONValue

__all__ = ["QueryReader", "parse_datetime", "validation_error"]


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
    return EPOCH + timedelta(seconds=seconds)


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
    return as_utc(parsed)


def validation_error(
    error_type: str, name: str, msg: str, value: str | None, ctx: dict[str, JSONValue] | None = None
) -> ErrorEntry:
    entry: ErrorEntry = {
        "type": error_type,
        "loc": ["query", name],
        "msg": msg,
        "input": value,
    }
    if ctx is not None:
        entry["ctx"] = ctx
    return entry


# pydantic's lax int from a string: an optional sign and digits, surrounding whitespace allowed.
_INT_RE: Final = re.compile(r"\s*[+-]?\d+\s*", re.ASCII)


class QueryReader:
    """Reads a query's parameters, collecting every validation error as FastAPI would report them.

    Each reader method returns a placeholder when the value is bad; call `check()` before using
    the values, which raises Invalid with all the errors in the order the parameters were read.
    """

    def __init__(self, query: Mapping[str, Sequence[str]]) -> None:
        self._query = query
        self.errors: list[ErrorEntry] = []

    def last(self, name: str) -> str | None:
        """A scalar parameter: like Starlette, the last of repeated keys wins."""
        values = self._query.get(name, ())
        return values[-1] if values else None

    def strings(self, name: str) -> list[str]:
        """An array parameter: every value of the repeated key, in order."""
        return list(self._query.get(name, ()))

    def date_time(self, name: str) -> datetime | None:
        """A `datetime | None` parameter (see `parse_datetime`): None when absent or bad."""
        raw = self.last(name)
        if raw is None:
            return None
        try:
            return parse_datetime(raw)
        except ValueError as exc:
            reason = str(exc)
            message = f"Input should be a valid datetime or date, {reason}"
            self.errors.append(validation_error("datetime_from_date_parsing", name, message, raw, {"error": reason}))
            return None

    def integer(self, name: str, default: int | None, *, ge: int | None = None, le: int | None = None) -> int:
        """An `int` parameter (required when `default` is None) with optional bounds."""
        raw = self.last(name)
        if raw is None:
            if default is None:
                self.errors.append(validation_error("missing", name, "Field required", None))
                return 0
            return default
        if _INT_RE.fullmatch(raw) is None:
            message = "Input should be a valid integer, unable to parse string as an integer"
            self.errors.append(validation_error("int_parsing", name, message, raw))
            return 0
        value = int(raw)
        if ge is not None and value < ge:
            message = f"Input should be greater than or equal to {ge}"
            self.errors.append(validation_error("greater_than_equal", name, message, raw, {"ge": ge}))
        elif le is not None and value > le:
            message = f"Input should be less than or equal to {le}"
            self.errors.append(validation_error("less_than_equal", name, message, raw, {"le": le}))
        return value

    def optional_integer(self, name: str) -> int | None:
        """An `int | None` parameter: None when absent."""
        return None if self.last(name) is None else self.integer(name, 0)

    def check(self) -> None:
        if self.errors:
            raise Invalid(self.errors)
