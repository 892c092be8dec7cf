"""What a route sees of a request and what it answers: the contract between app.py and v2/v3."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import TypeAlias

from exporter.simulator.model import Organization

__all__ = ["Call", "ErrorEntry", "Invalid", "JSONPath", "JSONValue", "NotFound", "Reply", "Route"]

JSONValue: TypeAlias = bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"] | None
JSONPath: TypeAlias = tuple[str | int, ...]
ErrorEntry: TypeAlias = dict[str, JSONValue]  # one FastAPI validation error: type, loc, msg, ...


@dataclass(frozen=True)
class Call:
    """One API request as a route handler sees it: no aiohttp, so handlers are plain functions."""

    path: str
    query: Mapping[str, Sequence[str]]  # every value of a repeated key, in order
    params: Mapping[str, str]  # path parameters
    now: datetime
    organizations: tuple[Organization, ...]  # the enterprise's, as listed now
    page_size: int  # the most items a list page holds, whatever the client asks for
    runaway_cursor: bool = False  # the fault: every list page says a next one follows

    @cached_property  # asked several times per request; with 1,000 organizations the tuple shows in profiles
    def enterprise_org_ids(self) -> tuple[str, ...]:
        """What "no org_ids" means: every organization currently listed."""
        return tuple(o.org_id for o in self.organizations)


@dataclass(frozen=True)
class Reply:
    """A route's 200 body, and where the malformed faults should break it.

    `lead` is the path to the number a client must check (made negative or huge), `required`
    the path to a field a client cannot do without (left out).
    """

    body: JSONValue
    lead: JSONPath = ()
    required: JSONPath = ()


class Invalid(Exception):
    """The query failed validation: a 422 carrying these entries, shaped per API version."""

    def __init__(self, errors: Sequence[ErrorEntry]) -> None:
        super().__init__(f"{len(errors)} validation error(s)")
        self.errors = list(errors)


class NotFound(Exception):
    """The path names something the enterprise does not have: a 404 with this detail."""


@dataclass(frozen=True)
class Route:
    """A GET route: an aiohttp path pattern and the function that answers it."""

    path: str
    handler: Callable[[Call], Reply] = field(compare=False)
