"""The exporter's own families (health, API counters, build and reload), declared once like the catalogue's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class SelfFamily:
    name: str  # as exposed (counters with their _total)
    type: str  # gauge, counter, histogram
    labels: tuple[str, ...]
    help: str
    example: str = ""  # a PromQL query for the README


_FAMILIES: Final = (
    SelfFamily("devin_up", "gauge", ("org",),
               "1 if the latest poll of every window of every collector of the org set succeeded, else 0",
               "devin_up == 0"),
    SelfFamily("devin_usage_last_success_timestamp_seconds", "gauge", ("org", "window"),
               "Unix time of the last successful poll of the org set and window (usage collector)",
               "time() - devin_usage_last_success_timestamp_seconds"),
    SelfFamily("devin_exporter_poll_interval_seconds", "gauge", ("collector", "org", "window"),
               "Configured poll interval of the schedule (enterprise-level collectors have no org or window)",
               'time() - devin_collector_last_success_timestamp_seconds > on (collector, org, window) '
               '3 * devin_exporter_poll_interval_seconds'),
    SelfFamily("devin_collector_up", "gauge", ("collector", "org"),
               "1 if the latest poll of every window of the collector succeeded, else 0 (no org label for "
               "enterprise-level collectors)", 'devin_collector_up == 0'),
    SelfFamily("devin_collector_last_success_timestamp_seconds", "gauge", ("collector", "org", "window"),
               "Unix time of the last successful poll of the schedule",
               'time() - devin_collector_last_success_timestamp_seconds{collector="organizations"}'),
    SelfFamily("devin_exporter_api_requests_total", "counter", ("collector", "org", "code"),
               "HTTP responses received from the Devin API, by status code",
               "sum by (code) (rate(devin_exporter_api_requests_total[5m]))"),
    SelfFamily("devin_exporter_api_errors_total", "counter", ("collector", "org", "reason"),
               "Failed Devin API attempts, by reason",
               'increase(devin_exporter_api_errors_total{reason="rate_limited"}[1h])'),
    SelfFamily("devin_exporter_api_request_duration_seconds", "histogram", ("collector", "org"),
               "Latency of each Devin API attempt",
               "histogram_quantile(0.99, sum by (le) (rate(devin_exporter_api_request_duration_seconds_bucket[5m])))"),
    SelfFamily("devin_exporter_build_info", "gauge", ("version", "python_version"),
               "Build information; constant 1", "devin_exporter_build_info"),
    SelfFamily("devin_exporter_api_info", "gauge", ("version",),
               "The Devin API version in use (v3 or v2); constant 1", 'devin_exporter_api_info{version="v2"}'),
    SelfFamily("devin_exporter_config_last_reload_successful", "gauge", (),
               "1 if the last config load or reload succeeded, else 0",
               "devin_exporter_config_last_reload_successful == 0"),
    SelfFamily("devin_exporter_config_last_reload_success_timestamp_seconds", "gauge", (),
               "Unix time of the last successful config load or reload",
               "time() - devin_exporter_config_last_reload_success_timestamp_seconds"),
)
SELF: Final = {f.name: f for f in _FAMILIES}
