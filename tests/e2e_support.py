"""Helpers for the end-to-end test with a real Prometheus server: processes, polling, HTTP, dashboards."""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
RULES_FILE: Final = REPO_ROOT / "helm" / "devin-usage-exporter" / "files" / "prometheus-rules.yaml"
DASHBOARD_FILE: Final = REPO_ROOT / "helm" / "devin-usage-exporter" / "files" / "grafana-dashboard.json"

T = TypeVar("T")


# ---------------------------------------------------------------------------------- processes


def free_port() -> int:
    """A port that was free a moment ago (bind to 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def python_env() -> dict[str, str]:
    """The environment for `python -m exporter` subprocesses: the checkout first on the path."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    env.pop("DEVIN_API_KEY", None)  # the configs here name their key; the simulator uses its default
    return env


@dataclass
class Process:
    """A subprocess whose stderr (and optionally stdout) goes to a log file, for failure messages."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        code = self.popen.poll()
        if code is not None:
            raise AssertionError(f"{self.name} exited with {code}; log tail:\n{self.tail()}")

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()


@dataclass
class Processes:
    """Every process the test started, stopped in reverse order by `stop_all`."""

    started: list[Process] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], log_dir: Path, *, capture_stdout: bool = False,
              env: Mapping[str, str] | None = None) -> Process:
        log = log_dir / f"{name}.log"
        with open(log, "wb") as log_file:  # the child keeps its own descriptor
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if capture_stdout else log_file,
                stderr=log_file,
                env=dict(env) if env is not None else None,
                cwd=log_dir,
            )
        proc = Process(name, popen, log)
        self.started.append(proc)
        return proc

    def check_alive(self) -> None:
        for proc in self.started:
            proc.check_alive()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ({p.log}) ---\n{p.tail()}" for p in self.started)

    def stop_all(self) -> None:
        errors: list[BaseException] = []
        for proc in reversed(self.started):
            try:
                proc.stop()
            except BaseException as exc:  # stop the others anyway
                errors.append(exc)
        self.started.clear()
        if errors:
            raise errors[0]


def read_line(proc: Process, deadline: float) -> str:
    """One line of the process' stdout, failing when the deadline passes or the process exits."""
    stream = proc.popen.stdout
    assert stream is not None, "start the process with capture_stdout=True"
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while not buffer.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{proc.name} printed no line in time; log:\n{proc.tail()}")
            if not selector.select(remaining):
                continue
            chunk = os.read(stream.fileno(), 1)  # byte by byte: nothing after the line is consumed
            if not chunk:
                raise AssertionError(
                    f"{proc.name} closed stdout (exit {proc.popen.poll()}); log:\n{proc.tail()}")
            buffer += chunk
    return buffer.decode()


def wait_until(what: str, probe: Callable[[], T | None], *, timeout: float, interval: float = 0.2,
               processes: Processes | None = None) -> T:
    """Call `probe` until it returns something other than None (or False); fail after `timeout`.

    Exceptions from the probe count as "not yet" (a server still starting refuses connections);
    the last one is in the failure message, with the tails of the processes' logs.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        if processes is not None:
            processes.check_alive()
        try:
            result = probe()
        except (OSError, ValueError, KeyError, AssertionError) as exc:
            result, last = None, exc
        if result is not None and result is not False:
            return result
        if time.monotonic() >= deadline:
            logs = f"\n{processes.logs()}" if processes is not None else ""
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; "
                                 f"last: {last!r}{logs}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------- HTTP


def http_get(url: str, params: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
             *, timeout: float = 5.0) -> tuple[int, bytes]:
    if params:
        url = f"{url}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_json(method: str, url: str, body: object = None, *, timeout: float = 5.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return json.loads(resp.read())


@dataclass
class PromAPI:
    """The few Prometheus HTTP API calls the test makes; every call asserts status success."""

    url: str

    def get(self, path: str, params: Mapping[str, str] | Sequence[tuple[str, str]] | None = None) -> Any:
        status, body = http_get(self.url + path, params)
        payload = json.loads(body)
        assert status == 200 and payload.get("status") == "success", (path, params, status, payload)
        return payload["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's result as a list of {metric, value}; scalars become one sample."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.get("/api/v1/query", params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query_range", {"query": expr, "start": f"{start:.3f}",
                                                 "end": f"{end:.3f}", "step": f"{step:g}"})
        return list(data["result"])


# ---------------------------------------------------------------------------------- dashboard

# Grafana's variable syntaxes: $var, ${var}, ${var:format}, [[var]].
_VARIABLE_RE: Final = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)|\[\[(\w+)(?::[^\]]*)?\]\]")


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Replace Grafana variables by test values; an unknown variable is an error, not left as is."""

    def replace(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g is not None)
        if name not in values:
            raise KeyError(f"no test value for Grafana variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE_RE.sub(replace, expr)


def iter_panels(panels: Sequence[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    """Every panel, including the panels nested in (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels") or [])


def iter_dicts(node: object) -> Iterator[Mapping[str, Any]]:
    """Every JSON object anywhere in the document."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from iter_dicts(value)
    elif isinstance(node, list):
        for value in node:
            yield from iter_dicts(value)


_LABEL_VALUES_RE: Final = re.compile(r"^\s*label_values\(\s*(?:(.+?)\s*,\s*)?(\w+)\s*\)\s*$")


def parse_label_values(query: str) -> tuple[str | None, str]:
    """`label_values(selector, label)` -> (selector or None, label)."""
    match = _LABEL_VALUES_RE.match(query)
    if match is None:
        raise ValueError(f"not a label_values(...) query: {query!r}")
    return match.group(1), match.group(2)


def variable_query(variable: Mapping[str, Any]) -> str:
    """The query text of a Grafana query variable (string or Grafana 10's object form)."""
    query = variable.get("query")
    if isinstance(query, Mapping):
        query = query.get("query")
    if not isinstance(query, str) or not query:
        raise ValueError(f"variable {variable.get('name')!r} has no query")
    return query


def python_argv(*args: str) -> list[str]:
    return [sys.executable, *args]
