"""The built-in demo: a config pointed at the embedded simulator on loopback, v3 with discovery or legacy v2."""

from __future__ import annotations

from typing import Final

from exporter.config import ApiVersion, Config, parse_config

DEMO_LISTEN: Final = "127.0.0.1:9877"
# Both demos poll the simulator like this; then each has its own collectors and org sets.
_HEAD: Final = """
api:
  base_url: {base_url}
  api_key: {api_key}
  max_concurrency: 4
  max_requests_per_second: 20
poll:
  interval: 10s
  jitter: 0.1
windows: [1h, 24h, 7d, 30d]
"""
# v3: every organization the simulator lists becomes an org set, beside two configured ones.
DEMO_CONFIG_V3: Final = _HEAD + """collectors:
  organizations: {{interval: 30s}}
  consumption: {{interval: 30s}}
  queue: {{interval: 10s}}
discovery:
  organizations: true
  windows: [24h, 7d]
  labels: {{source: discovery}}
org_sets:
  - name: enterprise
  - name: mobile-oncall
    org_ids: [org-mobile]
    user_ids: [user-alice, user-bob]
    windows: [today, 24h, billing_cycle]
server:
  listen: {listen}
"""
# v2, as release 0.1 ran it (the organizations collector polls too).
DEMO_CONFIG_V2: Final = _HEAD + """collectors:
  organizations: {{interval: 30s}}
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


def demo_config(base_url: str, api_key: str, listen: str = DEMO_LISTEN, version: ApiVersion = "v3") -> Config:
    """The demo config of `version`, validated like any user's file (`api_key` must match the version)."""
    template = DEMO_CONFIG_V3 if version == "v3" else DEMO_CONFIG_V2
    text = template.format(base_url=base_url, api_key=api_key, listen=listen)
    return parse_config(text, "<demo>", env={})
