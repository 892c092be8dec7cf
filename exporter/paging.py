"""Reading every page of a list endpoint, once for both styles: v3 cursors and v2 skip/limit."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace
from typing import Final, TypeVar

from exporter.catalogue import replies
from exporter.catalogue.declare import Paging
from exporter.transport import ApiError, ErrorReason, InvalidResponse, Request, Transport

T = TypeVar("T")

PAGE_SIZE: Final = 200  # the most either version allows per page
# A cursor that never ends (a bug upstream or in a proxy) must fail the poll, not loop for ever:
# 1,000 pages is 200,000 items, far beyond any enterprise's organizations.
MAX_PAGES: Final = 1000


async def fetch_all(transport: Transport, request: Request, paging: Paging,
                    read_item: Callable[[object], T]) -> list[T]:
    """Every item of every page; ApiError(invalid_response) for a runaway or malformed cursor."""
    items: list[T] = []
    cursor: str | None = None
    skip = 0
    seen: set[str] = set()
    for _ in range(MAX_PAGES):
        if paging == "cursor":
            params = (*request.params, ("first", str(PAGE_SIZE)), *((("after", cursor),) if cursor else ()))
        else:
            params = (*request.params, ("skip", str(skip)), ("limit", str(PAGE_SIZE)))
        page_request = replace(request, params=params)
        if paging == "cursor":
            page, cursor = await transport.get(page_request, lambda d: _read_cursor_page(d, read_item))
            items += page
            if cursor is None:
                return items
            if cursor in seen:
                raise _runaway(request, f"cursor {replies.describe(cursor)} came back")
            seen.add(cursor)
        else:
            read_page = functools.partial(_read_skip_page, read_item=read_item, skip=skip)
            page, next_skip = await transport.get(page_request, read_page)
            items += page
            if next_skip is None:
                return items
            if next_skip <= skip:
                raise _runaway(request, f"next skip {next_skip} does not move past {skip}")
            skip = next_skip
    raise _runaway(request, f"still more pages after {MAX_PAGES}")


def _runaway(request: Request, why: str) -> ApiError:
    return ApiError(ErrorReason.INVALID_RESPONSE, f"paging of {request.path} does not end: {why}")


def _items(document: object, read_item: Callable[[object], T]) -> tuple[dict[str, object], list[T]]:
    page = dict(replies.obj(document))
    raw = page.get("items")
    if not isinstance(raw, list):
        raise InvalidResponse(f"field 'items' is {replies.describe(raw)}, not an array")
    return page, [read_item(item) for item in raw]


def _flag(page: dict[str, object], name: str) -> bool:
    """A page's "more to come" flag; absent means false, as both versions default it."""
    more = page.get(name, False)
    if not isinstance(more, bool):
        raise InvalidResponse(f"field {name!r} is {replies.describe(more)}, not a boolean")
    return more


def _read_cursor_page(document: object, read_item: Callable[[object], T]) -> tuple[list[T], str | None]:
    """A v3 page: (items, the cursor of the next page or None on the last)."""
    page, items = _items(document, read_item)
    if not _flag(page, "has_next_page"):
        return items, None
    cursor = page.get("end_cursor")
    if not isinstance(cursor, str) or not cursor:
        raise InvalidResponse(f"has_next_page is true but end_cursor is {replies.describe(cursor)}")
    return items, cursor


def _read_skip_page(document: object, *, read_item: Callable[[object], T], skip: int) -> tuple[list[T], int | None]:
    """A v2 page: (items, the skip of the next page or None on the last)."""
    page, items = _items(document, read_item)
    if not _flag(page, "has_more"):
        return items, None
    next_cursor = page.get("next_cursor")
    if next_cursor is None:
        return items, skip + len(items)
    return items, replies.count("next_cursor", next_cursor)
