"""The built-in demo: a config of a few org sets pointed at the embedded simulator on loopback."""

from __future__ import annotations

from exporter.config import Config, parse_config

DEMO_LISTEN = "127.0.0.1:9877"
DEMO_CONFIG_TEMPLATE = """
api:
  base_url: {base_url}
  api_key: {api_key}
  max_concurrency: 4
  max_requests_per_second: 20
poll:
  interval: 10s
  jitter: 0.1
windows: [1h, 24h, 7d, 30d]
org_sets:
  - name: enterprise
  - name: platform
    org_ids: [org-platform-1, org-platform-2]
    labels: {{team: platform}}
  - name: mobile
    org_ids: [org-mobile]
    labels: {{team: mobile}}
  - name: mobile-oncall
    org_ids: [org-mobile]
    user_ids: [user-alice, user-bob]
    windows: [today, 24h, billing_cycle]
server:
  listen: {listen}
"""


def demo_config(base_url: str, api_key: str, listen: str = DEMO_LISTEN) -> Config:
    """The demo config, validated like any user's file."""
    text = DEMO_CONFIG_TEMPLATE.format(base_url=base_url, api_key=api_key, listen=listen)
    return parse_config(text, "<demo>", env={})
