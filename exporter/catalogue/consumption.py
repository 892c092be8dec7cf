"""The consumption collector: ACUs an org set used in each window, and on v3 their split by product (SPEC §10).

The enterprise endpoint answers a set without filters; a set with org_ids is the sum of its
organizations' endpoints, one with user_ids the sum of its users'. A set with both has no
endpoint that means it, so it gets no consumption series at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from exporter.catalogue import replies
from exporter.catalogue.declare import Collector, Endpoint, Family, Point, Query, one_label

ACUS: Final = "devin_consumption_acus"
BY_PRODUCT: Final = "devin_consumption_acus_by_product"

FAMILIES: Final = (
    Family(ACUS, "ACUs consumed in the trailing window (billing days start at 08:00 UTC; with org_ids, "
           "Devin session ACUs only)"),
    Family(BY_PRODUCT, "ACUs consumed in the trailing window, by product (v3 only)", ("product",)),
)

Reply = Mapping[str, object]


def _read_v3_day(item: object) -> dict[str, object]:
    day = replies.fields(item, {"date": replies.unix_time, "acus": replies.amount,
                                "acus_by_product": replies.amount_map}, what="consumption_by_date item")
    return day


def _read_v3(document: object) -> dict[str, object]:
    reply = replies.fields(document, {"total_acus": replies.amount, "consumption_by_date": replies.array_of(
        _read_v3_day, "consumption_by_date")})
    return reply


def _v3_points(replies_: Sequence[Reply], query: Query) -> Iterable[Point]:
    for reply in replies_:
        total = reply["total_acus"]
        assert isinstance(total, float)
        yield Point(ACUS, total)
        products: dict[str, float] = {}
        days = reply["consumption_by_date"]
        assert isinstance(days, list)
        for day in days:
            for product, acus in day["acus_by_product"].items():
                products[product] = products.get(product, 0.0) + acus
        for product, acus in sorted(products.items()):
            yield Point(BY_PRODUCT, acus, one_label("product", product))


def _read_v2(document: object) -> dict[str, object]:
    return replies.fields(document, {"total_acus": replies.amount, "consumption_by_date": replies.amount_map})


def _v2_points(replies_: Sequence[Reply], query: Query) -> Iterable[Point]:
    for reply in replies_:
        total = reply["total_acus"]
        assert isinstance(total, float)
        yield Point(ACUS, total)


_V3_FAMILIES: Final = (ACUS, BY_PRODUCT)
V3_ENTERPRISE: Final = Endpoint("/v3/enterprise/consumption/daily", "v3", _read_v3, _v3_points, _V3_FAMILIES,
                                bounds="unix")
V3_ORGANIZATION: Final = Endpoint("/v3/enterprise/consumption/daily/organizations/{id}", "v3", _read_v3,
                                  _v3_points, _V3_FAMILIES, bounds="unix", per="org_ids")
V3_USER: Final = Endpoint("/v3/enterprise/consumption/daily/users/{id}", "v3", _read_v3, _v3_points,
                          _V3_FAMILIES, bounds="unix", per="user_ids")
V2_DAILY: Final = Endpoint("/v2/enterprise/consumption/daily", "v2", _read_v2, _v2_points, (ACUS,),
                           bounds="rfc3339", filters=frozenset({"org_ids"}))
V2_USER: Final = Endpoint("/v2/enterprise/consumption/daily/{id}", "v2", _read_v2, _v2_points, (ACUS,),
                          bounds="rfc3339", per="user_ids")

CONSUMPTION: Final = Collector(
    "consumption", "org_set", FAMILIES,
    {"v3": ((V3_ENTERPRISE, V3_ORGANIZATION, V3_USER),), "v2": ((V2_DAILY, V2_USER),)},
    permission="ViewAccountConsumption (older name: ManageBilling)",
    # Consumption is billed per cycle: billing_cycle sends the cycle's bounds on both versions.
    cycle_bounds=frozenset({"v3", "v2"}))
