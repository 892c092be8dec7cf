"""Prometheus exporter for Devin enterprise usage metrics."""

__version__ = "0.1.0"
USER_AGENT = f"devin-usage-exporter/{__version__}"
