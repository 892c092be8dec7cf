"""A faithful stand-in for Devin's enterprise API, v2 and v3, over real sockets, with switchable faults."""

# `app` serves the routes of `v2` and `v3` behind one front (token check, faults, rate limit,
# request log); `model` computes every number; each `expected_*` says exactly what a route serves.

from exporter.simulator.app import (
    DEFAULT_DEMO_KEY,
    DEFAULT_V3_TOKEN,
    FAULTS_KEY,
    ORGANIZATIONS_KEY,
    REQUESTS_KEY,
    CreateAppOptions,
    RecordedRequest,
    create_app,
    start_simulator,
)
from exporter.simulator.cli import main
from exporter.simulator.faults import MALFORMED_KINDS, Faults, MalformedKind
from exporter.simulator.model import (
    DEFAULT_ORGANIZATIONS,
    ENTERPRISE_ORG_IDS,
    ENTERPRISE_USER_IDS,
    INCEPTION,
    Organization,
    billing_cycle,
)
from exporter.simulator.query import parse_datetime
from exporter.simulator.v2 import (
    USAGE_FIELDS,
    USAGE_PATH,
    expected_consumption_v2,
    expected_cycles_v2,
    expected_organizations_v2,
    expected_usage,
)
from exporter.simulator.v3 import (
    expected_active_users,
    expected_consumption_v3,
    expected_cycles_v3,
    expected_organizations_v3,
    expected_prs,
    expected_queue,
    expected_searches,
    expected_sessions,
    expected_usage_v3,
)

__all__ = [
    "DEFAULT_DEMO_KEY",
    "DEFAULT_ORGANIZATIONS",
    "DEFAULT_V3_TOKEN",
    "ENTERPRISE_ORG_IDS",
    "ENTERPRISE_USER_IDS",
    "FAULTS_KEY",
    "INCEPTION",
    "MALFORMED_KINDS",
    "ORGANIZATIONS_KEY",
    "REQUESTS_KEY",
    "USAGE_FIELDS",
    "USAGE_PATH",
    "CreateAppOptions",
    "Faults",
    "MalformedKind",
    "Organization",
    "RecordedRequest",
    "billing_cycle",
    "create_app",
    "expected_active_users",
    "expected_consumption_v2",
    "expected_consumption_v3",
    "expected_cycles_v2",
    "expected_cycles_v3",
    "expected_organizations_v2",
    "expected_organizations_v3",
    "expected_prs",
    "expected_queue",
    "expected_searches",
    "expected_sessions",
    "expected_usage",
    "expected_usage_v3",
    "main",
    "parse_datetime",
    "start_simulator",
]
