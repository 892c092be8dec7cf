"""The queue collector (v3 only): the enterprise's Devin session queue and its status (SPEC §10)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Final

from exporter.catalogue import replies
from exporter.catalogue.declare import Collector, Endpoint, Family, Point, Query, one_label
from exporter.transport import InvalidResponse

SIZE: Final = "devin_queue_size"
STATUS: Final = "devin_queue_status"
STATUSES: Final = ("normal", "elevated", "high")
# A status upstream may add later is published too (as 1, the others 0), if it looks like one.
_STATUS_SHAPE: Final = re.compile(r"[a-z][a-z0-9_]{0,31}")


def _status(name: str, value: object) -> str:
    text = replies.text(name, value)
    if not _STATUS_SHAPE.fullmatch(text):
        raise InvalidResponse(f"field {name!r} is {replies.describe(value)}, not a queue status")
    return text


def _read(document: object) -> dict[str, object]:
    return replies.fields(document, {"queue_size": replies.count, "status": _status})


def _points(replies_: Sequence[dict[str, object]], query: Query) -> Iterable[Point]:
    for reply in replies_:
        size, current = reply["queue_size"], reply["status"]
        assert isinstance(size, int) and isinstance(current, str)
        yield Point(SIZE, size)
        # A state set: every known status, 1 for the current one, so alerts need no absent().
        for status in (*STATUSES, *(() if current in STATUSES else (current,))):
            yield Point(STATUS, 1.0 if status == current else 0.0, one_label("status", status))


V3_QUEUE: Final = Endpoint("/v3/enterprise/queue", "v3", _read, _points, (SIZE, STATUS))

QUEUE: Final = Collector(
    "queue", "enterprise",
    (Family(SIZE, "Devin sessions queued in the enterprise (statuses new, resuming, claimed)"),
     Family(STATUS, "1 for the queue's current status (normal <= 10, elevated 11-50, high > 50 queued), "
            "0 for the others", ("status",))),
    {"v3": ((V3_QUEUE,),)}, permission="ViewAccountMetrics", windowed=False)
