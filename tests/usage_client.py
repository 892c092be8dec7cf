"""Release 0.1's usage client, rebuilt from the transport and the v2 usage declaration, for the client tests.

The tests of request shape, errors, retries and limits were written against `UsageClient.fetch`;
they keep their assertions, and this adapter asks the same question through the code that now
answers it: the declaration builds the request, the transport sends it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import aiohttp

from exporter.catalogue.declare import Query
from exporter.catalogue.usage import EXTRA_PREFIX, USAGE, V2_FIELDS, V2_USAGE
from exporter.config import ApiSettings
from exporter.fetch import call_endpoint
from exporter.transport import Transport

_FIELD_OF = {family: field for field, family in V2_FIELDS.items()}


@dataclass(frozen=True)
class UsageQuery:
    org_set: str
    start: datetime | None
    end: datetime | None
    org_ids: tuple[str, ...] = ()
    user_ids: tuple[str, ...] = ()


class UsageClient(Transport):
    """A Transport with release 0.1's `fetch(UsageQuery) -> {API field: value}`."""

    def __init__(self, session: aiohttp.ClientSession, settings: ApiSettings, **kwargs: object) -> None:
        super().__init__(session, settings, **kwargs)  # type: ignore[arg-type]

    async def fetch(self, query: UsageQuery) -> dict[str, float]:
        points = await call_endpoint(self, USAGE, V2_USAGE, query.org_set,
                                     Query(query.org_ids, query.user_ids, query.start, query.end))
        return {_FIELD_OF.get(p.family, p.family.removeprefix(EXTRA_PREFIX)): p.value for p in points}
