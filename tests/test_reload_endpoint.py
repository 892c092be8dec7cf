"""POST /-/reload (SPEC §13): the SIGHUP reload over HTTP, behind server.enable_lifecycle and basic auth.

The exporter reads a real config file; a test rewrites the file and asks for a reload, as an
operator (or a config-reloader sidecar) would.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Final

import aiohttp
import bcrypt
import pytest
from helpers import T0, config_text, labels, wait_until
from v3_support import V3_TOKEN, Rig, Rigs, of_org

from exporter.config import Config, load_config
from exporter.service import Exporter

TWO_SETS: Final = """
- name: enterprise
- name: platform
  org_ids: [org-platform-1, org-mobile]
"""
NEW_SETS: Final = """
- name: enterprise
- name: newcomer
  org_ids: [org-456]
  windows: [7d]
"""
LIFECYCLE: Final = "enable_lifecycle: true"
PASSWORD: Final = "reload me, please"
# Cost 4 keeps the test fast; the hash is what a web config file holds.
HASH: Final = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()


class ConfigFile:
    """The exporter's config file, written for the simulator's URL once it is known."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "config.yaml"
        self.base_url = ""

    def write(self, org_sets: str = TWO_SETS, *, server: str = LIFECYCLE, text: str | None = None) -> None:
        self.path.write_text(text if text is not None else config_text(
            self.base_url, org_sets, key=V3_TOKEN, collectors="{}", windows="[1h]", server=server))

    def build(self, base_url: str) -> Config:
        self.base_url = base_url
        if not self.path.exists():
            self.write()
        return self.load()

    def load(self) -> Config:
        return load_config(self.path, env={})


async def start(rigs: Rigs, file: ConfigFile) -> Rig:
    return await rigs.start(build=file.build, reload=file.load)


async def post_reload(rig: Rig, auth: tuple[str, str] | None = None) -> tuple[int, str]:
    headers = {"Authorization": aiohttp.encode_basic_auth(*auth)} if auth is not None else None
    response = await rig.client.post("/-/reload", headers=headers)
    return response.status, await response.text()


async def test_post_reload_applies_the_new_config(rigs: Rigs, tmp_path: Path) -> None:
    file = ConfigFile(tmp_path)
    rig = await start(rigs, file)
    assert rig.set_names() == ["enterprise", "platform"]
    assert of_org(await rig.samples(), "platform")

    rig.clock.advance(60)
    file.write(NEW_SETS)
    assert await post_reload(rig) == (200, "config reloaded\n")
    assert rig.set_names() == ["enterprise", "newcomer"]
    await rig.wait_polled("the new org set's first poll")
    samples = await rig.samples()
    assert samples["devin_usage_sessions"].keys() >= {labels(org="newcomer", window="7d")}
    assert samples["devin_up"] == {labels(org="enterprise"): 1.0, labels(org="newcomer"): 1.0}
    assert of_org(samples, "platform") == {}  # every series of the removed set is gone
    assert samples["devin_exporter_config_last_reload_successful"] == {labels(): 1.0}
    assert samples["devin_exporter_config_last_reload_success_timestamp_seconds"] == {
        labels(): T0.timestamp() + 60}
    assert any(tuple(r.query.get("org_ids", ())) == ("org-456",) for r in rig.requests())

    # A reload that turns the lifecycle API off is the last one it accepts.
    file.write(NEW_SETS, server="")
    assert (await post_reload(rig))[0] == 200
    assert (await post_reload(rig))[0] == 403


async def test_the_daemon_freezes_the_heap_after_its_first_cycle_and_after_each_applied_reload(
        rigs: Rigs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """gc.freeze(), so that a full collection does not scan the config and snapshot (see Exporter._freeze)."""
    freezes: list[None] = []
    monkeypatch.setattr(gc, "freeze", lambda: freezes.append(None))
    defaults = Exporter.__init__.__kwdefaults__
    assert defaults is not None
    monkeypatch.setitem(defaults, "freeze_gc", True)  # as the daemon (cli) makes it
    file = ConfigFile(tmp_path)
    rig = await start(rigs, file)  # returns once every schedule has polled
    await wait_until(lambda: freezes, what="the freeze after the first cycle")
    assert len(freezes) == 1
    file.write(NEW_SETS)
    assert await post_reload(rig) == (200, "config reloaded\n")
    assert len(freezes) == 2
    await rig.wait_polled("the new org set's first poll")
    file.write("org_sets: [")
    assert (await post_reload(rig))[0] == 500
    assert len(freezes) == 2  # a rejected reload changes nothing, and the first cycle is long done


@pytest.mark.parametrize("broken, reason", [
    ("poll: {intervall: 1m}", "poll.intervall: unknown key; did you mean 'interval'?"),
    ("api: [unclosed", "invalid YAML"),
    ("", "the file is empty"),
], ids=["typo", "yaml", "empty"])
async def test_a_broken_config_answers_500_with_the_one_line_reason_and_the_old_config_keeps_running(
    rigs: Rigs, tmp_path: Path, broken: str, reason: str
) -> None:
    file = ConfigFile(tmp_path)
    rig = await start(rigs, file)
    before = await rig.samples()
    running = rig.config

    file.write(text=broken)
    status, body = await post_reload(rig)
    assert status == 500
    assert body.endswith("\n") and "\n" not in body[:-1], f"not one line: {body!r}"
    assert reason in body and str(file.path) in body
    assert V3_TOKEN not in body
    assert rig.config is running
    after = await rig.samples()
    assert after["devin_exporter_config_last_reload_successful"] == {labels(): 0.0}
    assert after["devin_exporter_config_last_reload_success_timestamp_seconds"] == {labels(): T0.timestamp()}
    assert after["devin_usage_sessions"] == before["devin_usage_sessions"]
    assert after["devin_up"] == before["devin_up"]

    # Fixed, it applies, and the gauge says so.
    file.write(NEW_SETS)
    assert (await post_reload(rig))[0] == 200
    assert (await rig.samples())["devin_exporter_config_last_reload_successful"] == {labels(): 1.0}


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_other_methods_get_405_and_reload_nothing(rigs: Rigs, tmp_path: Path, method: str) -> None:
    file = ConfigFile(tmp_path)
    rig = await start(rigs, file)
    file.write(NEW_SETS)
    response = await rig.client.request(method, "/-/reload")
    assert response.status == 405
    assert response.headers["Allow"] == "POST"
    assert rig.set_names() == ["enterprise", "platform"]


@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_without_enable_lifecycle_the_endpoint_answers_403_and_reloads_nothing(
    rigs: Rigs, tmp_path: Path, method: str
) -> None:
    file = ConfigFile(tmp_path)
    rig = await rigs.start(build=lambda url: _written(file, url, server=""), reload=file.load)
    assert rig.config.server.enable_lifecycle is False
    file.write(NEW_SETS, server=LIFECYCLE)
    response = await rig.client.request(method, "/-/reload")
    assert response.status == 403
    assert "enable_lifecycle" in await response.text()
    assert rig.set_names() == ["enterprise", "platform"]


def _written(file: ConfigFile, base_url: str, *, server: str) -> Config:
    file.base_url = base_url
    file.write(server=server)
    return file.load()


async def test_the_endpoint_sits_behind_basic_auth(rigs: Rigs, tmp_path: Path) -> None:
    (tmp_path / "web.yml").write_text(f"basic_auth_users:\n  prometheus: '{HASH}'\n")
    file = ConfigFile(tmp_path)
    server = f"{LIFECYCLE}\nweb_config_file: web.yml"
    rig = await rigs.start(build=lambda url: _written(file, url, server=server), reload=file.load)
    file.write(NEW_SETS, server=server)

    for auth in (None, ("prometheus", "wrong"), ("intruder", PASSWORD)):
        status, _ = await post_reload(rig, auth=auth)
        assert status == 401, auth
        assert rig.set_names() == ["enterprise", "platform"]
    assert await post_reload(rig, auth=("prometheus", PASSWORD)) == (200, "config reloaded\n")
    assert rig.set_names() == ["enterprise", "newcomer"]
