"""The API key never leaks: not in logs (at debug, both formats), errors, endpoints or CLI output.

A recognisable canary key is driven through every path that logs or raises, against an upstream
that echoes the credential back in every way a broken proxy might: in HTML and JSON error bodies,
a 422's detail, a redirect's Location, a 200 whose fields hold it, padded so that truncation cuts
it in half. Any 10-character stretch of the key found anywhere is a leak.

Key rotation: `api.api_key_file` is re-read on SIGHUP, and the next requests carry the new key.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Final

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hardening_support import Daemon, free_port
from helpers import ROOT, labels, parse_samples, run_cli, subprocess_env, wait_until
from usage_client import UsageClient, UsageQuery

from exporter.config import ConfigError, parse_config
from exporter.logs import setup_logging
from exporter.secret import ApiKey
from exporter.server import create_app
from exporter.service import Exporter
from exporter.simulator import MALFORMED_KINDS, REQUESTS_KEY, USAGE_PATH, Faults, start_simulator
from exporter.transport import ApiError, new_session

KEY: Final = "apk_user_LEAKCANARY_0123456789abcdef"
GOOD: Final = {"sessions_count": 1, "searches_count": 2, "prs_opened": 3, "prs_closed": 2, "prs_merged": 1}


def leaks(text: str) -> list[str]:
    """Every 10-character stretch of the key found in `text` (a half-truncated key counts)."""
    return sorted({KEY[i : i + 10] for i in range(len(KEY) - 9) if KEY[i : i + 10] in text})


# --------------------------------------------------------------------------------------------
# an upstream that echoes the credential


def _echo(mode: str, auth: str) -> web.StreamResponse:
    token = auth.removeprefix("Bearer ")
    if mode == "ok":
        return web.json_response(GOOD)
    if mode == "html-500":
        return web.Response(
            status=500, content_type="text/html", text=f"<html><pre>Authorization: {auth}</pre></html>"
        )
    if mode == "plain-502":
        return web.Response(status=502, text=f"upstream said: token={token}")
    if mode == "json-401":
        return web.json_response({"detail": f"Invalid API key {token}"}, status=401)
    if mode == "text-403":
        return web.Response(status=403, text=f"{token} is not an enterprise admin key")
    if mode == "detail-422":
        return web.json_response(
            {"detail": [{"loc": ["query", token], "msg": f"bad {token}", "type": "x"}]}, status=422
        )
    if mode == "redirect":
        return web.Response(status=302, headers={"Location": f"/login?token={token}"})
    if mode == "retry-429":
        return web.Response(status=429, headers={"Retry-After": token}, text=auth)
    if mode == "not-json":
        return web.Response(status=200, text=f"hello {auth}")
    if mode == "field-holds-key":
        return web.json_response({**GOOD, "sessions_count": token})
    if mode == "long-field":
        return web.json_response({**GOOD, "prs_merged": "x" * 25 + token})
    if mode == "extra-named-key":
        return web.json_response({**GOOD, token: 7, f"x_{token}": 8})
    if mode.startswith("pad-"):  # the key straddles where error text is cut
        status, width = mode.split("-")[1:]
        return web.Response(status=int(status), text="x" * int(width) + token)
    if mode.startswith("redirect-pad-"):
        return web.Response(status=302, headers={"Location": "/" + "y" * int(mode.split("-")[2]) + token})
    raise AssertionError(mode)


MODES: Final = (
    [
        "ok",
        "html-500",
        "plain-502",
        "json-401",
        "text-403",
        "detail-422",
        "redirect",
        "retry-429",
        "not-json",
        "field-holds-key",
        "long-field",
        "extra-named-key",
    ]
    + [f"pad-{status}-{width}" for status in (400, 200) for width in range(170, 215, 3)]
    + [f"redirect-pad-{width}" for width in range(150, 215, 5)]
)


@pytest.fixture
async def echo() -> AsyncIterator[str]:
    async def usage(request: web.Request) -> web.StreamResponse:
        mode = request.query.get("org_ids", "ok")
        if mode == "hang":
            await asyncio.sleep(30)
        return _echo(mode, request.headers.get("Authorization", ""))

    app = web.Application()
    app.router.add_get(USAGE_PATH, usage)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}"
    await server.close()


def config_text(
    base_url: str, modes: list[str] = MODES, *, key_line: str = f"api_key: {KEY}", interval: str = "1h"
) -> str:
    sets = "".join(f"  - name: {m}\n    org_ids: [{m}]\n" for m in modes)
    return (
        f"api:\n  base_url: {base_url}\n  {key_line}\n  timeout: 1s\n  retries: 1\n"
        "  max_concurrency: 16\n  max_requests_per_second: 10000\n"
        f"poll:\n  interval: {interval}\n  jitter: 0\nwindows: [1h]\n"
        # Release 0.1's schedules, usage only: the counts below are of its requests and log lines.
        "collectors: {organizations: {enabled: false}, consumption: {enabled: false}}\n"
        f"org_sets:\n{sets}"
        "server:\n  listen: 127.0.0.1:0\n"
    )


@pytest.fixture
def real_logging(request: pytest.FixtureRequest) -> Iterator[io.StringIO]:
    """The exporter's own handler and formatter at debug, writing to a buffer; restored after."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    setup_logging("debug", request.param, stream=stream)
    yield stream
    root.handlers[:], root.level = saved


# --------------------------------------------------------------------------------------------
# in-process: logs, exceptions, endpoints


@pytest.mark.parametrize("real_logging", ["logfmt", "json"], indirect=True)
async def test_the_key_appears_in_no_log_error_or_endpoint_on_any_failure_path(
    echo: str, real_logging: io.StringIO, tmp_path: Path
) -> None:
    seen: list[str] = []
    config = parse_config(config_text(echo, [*MODES, "hang"]), "secrets.yaml", env={})
    exporter = Exporter(config, random=lambda: 0.0)
    client = TestClient(TestServer(create_app(exporter), host="127.0.0.1"))
    await client.start_server()
    try:
        await wait_until(lambda: exporter.ready(), within=15, what="every first poll (1s timeouts)")
        for path in ("/", "/metrics", "/readyz", "/healthz", "/metrics?name[]=devin_up"):
            response = await client.get(path)
            seen.append(await response.text())
            seen.append(str(response.headers))
        samples = parse_samples(seen[2])
        # The echoing upstream really was exercised: every failure reason came up.
        reasons = {
            dict(lbls)["reason"] for lbls, v in samples["devin_exporter_api_errors_total"].items() if v
        }
        assert reasons == {
            "server_error",
            "auth",
            "client_error",
            "rate_limited",
            "invalid_response",
            "timeout",
        }
        assert samples["devin_up"][labels(org="ok")] == 1.0
        assert samples["devin_up"][labels(org="extra-named-key")] == 1.0

        # A config with the key written into the wrong fields: rejected, logged, never quoted.
        for misplaced in (f"api_key_file: {KEY}", f"base_url: {KEY}", f"timeout: {KEY}"):
            text = config_text(echo, ["ok"], key_line=misplaced)
            assert await exporter.reload(lambda t=text: parse_config(t, "secrets.yaml", env={})) is False
        env_text = config_text(echo, ["ok"], key_line="api_key_file: ${DEVIN_API_KEY}")
        assert (
            await exporter.reload(lambda: parse_config(env_text, "secrets.yaml", env={"DEVIN_API_KEY": KEY}))
            is False
        )
    finally:
        await client.close()

    # Every failure as an exception, straight from the client: str, repr and args.
    # A key with whitespace (a bad rotation) cannot be sent; the refusal does not quote it.
    unsendable = dataclasses.replace(config.api, api_key=ApiKey(KEY + " trailing"))
    async with new_session() as session:
        for settings, modes in ((config.api, MODES), (unsendable, ["ok"])):
            usage = UsageClient(session, settings, random=lambda: 0.0)
            for mode in modes:
                try:
                    await usage.fetch(UsageQuery(mode, None, None, (mode,)))
                except ApiError as exc:
                    seen.extend([str(exc), repr(exc), repr(exc.args), exc.message])
    assert any("cannot be sent" in text for text in seen)
    seen.extend([repr(config), str(config), repr(config.api.api_key), f"{config.api.api_key}"])

    log = real_logging.getvalue()
    assert "usage API attempt" in log and "poll failed" in log and "config reload failed" in log
    if log.startswith("{"):
        assert all(isinstance(json.loads(line), dict) for line in log.splitlines())  # even for echoes
    assert leaks(log) == [], log
    for text in seen:
        assert leaks(text) == [], text


def test_config_errors_never_quote_a_misplaced_key(tmp_path: Path) -> None:
    skeleton = "org_sets: [{name: a}]\n"
    documents = [
        f"api: {{api_key_file: {KEY}}}\n",
        f"api: {{base_url: '{KEY}'}}\n",
        f"api: {{api_key: x, timeout: {KEY}}}\n",
        f"{KEY}: 1\napi: {{api_key: x}}\n",
        f"api: {{api_key: x}}\nwindows: [{KEY}]\n",
        f"api: {{api_key: x}}\npoll: {{timezone: {KEY}}}\n",
        f"api: {{api_key: x}}\nserver: {{listen: {KEY}}}\n",
        f"api: {{api_key: x}}\nserver: {{web_config_file: {KEY}}}\n",
        "api: {api_key_file: ${DEVIN_API_KEY}}\n",
        "api: {base_url: '${DEVIN_API_KEY}'}\n",
    ]
    for document in documents:
        with pytest.raises(ConfigError) as caught:
            parse_config(document + skeleton, "c.yaml", env={"DEVIN_API_KEY": KEY}, base_dir=tmp_path)
        assert leaks(str(caught.value)) == [], str(caught.value)


async def test_simulator_fault_responses_do_not_echo_the_key() -> None:
    faults = Faults()
    runner, base_url = await start_simulator(api_key="apk_user_the_right_one", faults=faults)
    variants: list[dict[str, object]] = [
        {},
        {"status": 429},
        {"status": 500},
        {"status": 401},
        {"status": 403},
        {"status": 422},
        {"redirect": True},
        {"error_rate": 1.0},
        {"rate_limit_per_second": 0.001},
        *({"malformed": kind} for kind in MALFORMED_KINDS),
    ]
    try:
        async with aiohttp.ClientSession() as session:
            for variant in variants:
                faults.reset()
                faults.update(variant)
                for params in ({}, {"start_date": KEY, "end_date": "x"}):
                    async with session.get(
                        base_url + USAGE_PATH,
                        params=params,
                        allow_redirects=False,
                        headers={"Authorization": f"Bearer {KEY}"},
                    ) as response:
                        text = await response.text() + str(response.headers)
                    # The 422 echoes query values as FastAPI does, never the Authorization header.
                    assert leaks(text.replace(f'"input": "{KEY}"', "")) == [], (variant, text)
            # It records what it was asked (the query, where the key was put as a date), never who asked.
            records = runner.app[REQUESTS_KEY]  # type: ignore[index]
            assert len(records) == 2 * len(variants)
            assert all(leaks(json.dumps({**r.to_json(), "query": None})) == [] for r in records)
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------------------------
# the command line as a process


async def _cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "exporter",
        *args,
        cwd=ROOT,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


@pytest.mark.parametrize("log_format", ["logfmt", "json"])
async def test_once_at_debug_prints_no_key_on_stdout_or_stderr(
    echo: str, tmp_path: Path, log_format: str
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(config_text(echo, key_line="api_key: ${DEVIN_API_KEY}"))
    code, stdout, stderr = await _cli(
        "--once",
        "--config",
        str(config),
        "--log-level",
        "debug",
        "--log-format",
        log_format,
        env=subprocess_env(DEVIN_API_KEY=KEY),
    )
    assert code == 1  # most org sets failed, as intended
    assert 'devin_up{org="ok"} 1.0' in stdout and "poll failed" in stderr and "usage API attempt" in stderr
    assert leaks(stdout) == [] and leaks(stderr) == [], stderr


def test_check_config_prints_no_key(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    config = tmp_path / "config.yaml"
    for key_line in ("api_key: ${DEVIN_API_KEY}", f"api_key: {KEY}", "api_key_file: key"):
        config.write_text(config_text("https://api.devin.ai", ["a"], key_line=key_line))
        result = run_cli(
            "--check-config",
            "--config",
            str(config),
            "--log-level",
            "debug",
            env=subprocess_env(DEVIN_API_KEY=KEY),
        )
        assert result.returncode == 0, result
        assert leaks(result.stdout + result.stderr) == []
    for key_line in (f"api_key_file: {KEY}", "api_key_file: ${DEVIN_API_KEY}", f"base_url: {KEY}"):
        config.write_text(config_text("https://api.devin.ai", ["a"], key_line=key_line))
        result = run_cli("--check-config", "--config", str(config), env=subprocess_env(DEVIN_API_KEY=KEY))
        assert result.returncode == 2, result
        assert leaks(result.stdout + result.stderr) == [], result.stderr


# --------------------------------------------------------------------------------------------
# key rotation


async def test_sighup_rereads_the_key_file_and_the_next_requests_use_the_new_key(tmp_path: Path) -> None:
    old, new = "apk_user_OLDKEY_revoked_0000", "apk_user_NEWKEY_rotated_1111"
    runner, base_url = await start_simulator(api_key=new)  # the old key has been revoked upstream
    key_file = tmp_path / "api-key"
    key_file.write_text(old + "\n")
    config = tmp_path / "config.yaml"
    port = free_port()
    config.write_text(
        config_text(base_url, ["a"], key_line="api_key_file: api-key", interval="1s").replace(
            "listen: 127.0.0.1:0", f"listen: 127.0.0.1:{port}"
        )
    )
    daemon = Daemon("--config", str(config), "--log-level", "debug")
    requests = runner.app[REQUESTS_KEY]  # type: ignore[index]

    async def devin_up() -> float | None:
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{port}/metrics") as r,
            ):
                return parse_samples(await r.text())["devin_up"][labels(org="a")]
        except aiohttp.ClientError:
            return None

    try:
        await wait_until(
            lambda: sum(1 for r in requests if r.status == 401) >= 2,
            within=15,
            what="polls rejected with the revoked key",
        )
        assert await devin_up() == 0.0
        key_file.write_text(new + "\n")  # what a Secret update or a rotation job does
        lines = len(daemon.lines["stderr"])
        daemon.popen.send_signal(signal.SIGHUP)
        # Blocking reads run in a thread: the simulator answering the daemon lives on this loop.
        await asyncio.to_thread(daemon.wait_for, 'msg="config reloaded"', after=lines)
        await wait_until(
            lambda: any(r.status == 200 for r in requests), within=10, what="a request with the new key"
        )
        first_ok = next(i for i, r in enumerate(requests) if r.status == 200)
        await wait_until(lambda: len(requests) >= first_ok + 3, within=10, what="more polls")
        # The old key is gone for good: every later request carried the new one.
        assert [r.status for r in list(requests)[first_ok:]] == [200] * (len(requests) - first_ok)
        for _ in range(100):  # bounded: up to ~5 s for a scrape to show the recovery
            if await devin_up() == 1.0:
                break
            await asyncio.sleep(0.05)
        assert await devin_up() == 1.0
    finally:
        assert await asyncio.to_thread(daemon.stop) == 0
        await runner.cleanup()
    assert old not in daemon.text() and new not in daemon.text()
    assert daemon.count(r'msg="poll failed: HTTP 401') == 1  # logged once, not once a second
    assert daemon.count(r'msg="poll recovered"') == 1
