"""server.web_config_file: TLS, mTLS and basic auth on the exporter's endpoints, over real sockets.

Certificates come from a throwaway CA made here with trustme. The exporter's upstream is a port
with nothing on it: these tests are about who may read /metrics, not about what it says.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import bcrypt
import pytest
import trustme
from aiohttp import web
from hardening_support import Daemon, free_port
from helpers import run_cli, subprocess_env

from exporter import webconfig
from exporter.config import Config, ConfigError, load_config
from exporter.server import create_app
from exporter.service import Exporter
from exporter.webconfig import AUTH_REALM, load_web_config

KEY = "apk_user_WEBCONFIG_0123456789"
PASSWORD = "correct horse battery staple"
# Cost 4 keeps the suite fast; the cache test counts bcrypt calls rather than timing them.
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
CHALLENGE = f'Basic realm="{AUTH_REALM}"'


@dataclass
class Pki:
    dir: Path
    ca: trustme.CA
    client: trustme.LeafCert  # issued by `ca`
    stranger: trustme.LeafCert  # issued by another CA

    def trust(self, *, cert: trustme.LeafCert | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        if cert is not None:
            cert.configure_cert(context)
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.cert_chain_pems[0].write_to_path(str(folder / "server.crt"))
    server.private_key_pem.write_to_path(str(folder / "server.key"))
    ca.cert_pem.write_to_path(str(folder / "ca.crt"))
    other = trustme.CA()
    other.cert_pem.write_to_path(str(folder / "other-ca.crt"))
    return Pki(folder, ca, ca.issue_cert("scraper@example.test"), other.issue_cert("intruder@example.test"))


def write_config(folder: Path, web: str | None, *, port: int = 0) -> Path:
    server = f"  listen: 127.0.0.1:{port}\n"
    if web is not None:
        (folder / "web.yml").write_text(web)
        server += "  web_config_file: web.yml\n"
    config = folder / "config.yaml"
    config.write_text(
        f"api:\n  base_url: http://127.0.0.1:{free_port()}\n  api_key: {KEY}\n  retries: 0\n"
        "poll:\n  interval: 1h\n  jitter: 0\nwindows: [1h]\norg_sets:\n  - name: enterprise\n"
        f"server:\n{server}"
    )
    return config


TLS = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"


@dataclass
class Served:
    url: str  # https://127.0.0.1:PORT or http://…
    config: Config


ServeFactory = Callable[[str | None], Awaitable[Served]]


@pytest.fixture
async def serve(pki: Pki, tmp_path: Path) -> AsyncIterator[ServeFactory]:
    """Serve the exporter app the way `cli.serve` does: the config's middlewares and SSL context."""
    runners: list[web.AppRunner] = []

    async def start(web_text: str | None) -> Served:
        folder = tmp_path / f"site{len(runners)}"
        folder.mkdir()
        for name in ("server.crt", "server.key", "ca.crt", "other-ca.crt"):
            (folder / name).write_bytes((pki.dir / name).read_bytes())
        config = load_config(write_config(folder, web_text), env={})
        tls = config.server.web_config.tls if config.server.web_config else None
        runner = web.AppRunner(create_app(Exporter(config)), access_log=None)
        runners.append(runner)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.ssl_context() if tls else None).start()
        port = runner.addresses[0][1]
        return Served(f"{'https' if tls else 'http'}://127.0.0.1:{port}", config)

    yield start
    for runner in runners:
        await runner.cleanup()


async def get(
    url: str,
    *,
    ssl_context: ssl.SSLContext | bool = True,
    auth: tuple[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], str]:
    if auth is not None:
        headers = {**(headers or {}), "Authorization": aiohttp.encode_basic_auth(*auth)}
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            url, ssl=ssl_context, headers=headers, timeout=aiohttp.ClientTimeout(total=10)
        ) as response,
    ):
        return response.status, dict(response.headers), await response.text()


# --------------------------------------------------------------------------------------------
# TLS


async def test_tls_serves_every_endpoint_over_https_to_a_client_that_trusts_the_ca(
    serve: ServeFactory, pki: Pki
) -> None:
    site = await serve(TLS)
    assert site.url.startswith("https://")
    for path in ("/metrics", "/healthz", "/"):
        status, _, body = await get(site.url + path, ssl_context=pki.trust())
        assert status == 200, path
    status, _, body = await get(site.url + "/metrics", ssl_context=pki.trust())
    assert "devin_up" in body
    # A client that does not trust our CA is refused by its own verification, as it should be.
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await get(site.url + "/metrics")


async def test_plain_http_to_the_tls_port_gets_no_metrics(serve: ServeFactory) -> None:
    site = await serve(TLS)
    plain = site.url.replace("https://", "http://")
    with pytest.raises(aiohttp.ClientError):
        await get(plain + "/metrics")


async def _handshake(port: int, context: ssl.SSLContext) -> str:
    """Connect and return the negotiated TLS version; raises if the server refuses."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="127.0.0.1"), 10
    )
    try:
        version = writer.get_extra_info("ssl_object").version()
        # With TLS 1.3 the server's verdict on a client certificate arrives after the handshake.
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 10)
        if not status:
            raise ConnectionResetError("closed after the handshake")
        return str(version)
    finally:
        writer.close()


def _old_tls_client(pki: Pki, version: ssl.TLSVersion) -> ssl.SSLContext:
    context = pki.trust()
    context.minimum_version = context.maximum_version = version
    if version < ssl.TLSVersion.TLSv1_2:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 refuses TLS 1.1 at its default level
    return context


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
async def test_tls_1_1_is_refused_even_by_default(serve: ServeFactory, pki: Pki) -> None:
    # Control: this OpenSSL can speak TLS 1.1 at all, or the refusal below would prove nothing.
    permissive = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    permissive.minimum_version = ssl.TLSVersion.TLSv1
    permissive.set_ciphers("DEFAULT:@SECLEVEL=0")
    permissive.load_cert_chain(pki.dir / "server.crt", pki.dir / "server.key")

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n")
        writer.close()

    control = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=permissive)
    try:
        try:
            negotiated = await _handshake(
                control.sockets[0].getsockname()[1], _old_tls_client(pki, ssl.TLSVersion.TLSv1_1)
            )
        except (ssl.SSLError, ConnectionError) as exc:
            pytest.skip(f"this OpenSSL build cannot negotiate TLS 1.1 at all ({exc})")
        assert negotiated == "TLSv1.1"
    finally:
        control.close()
        await control.wait_closed()

    site = await serve(TLS)
    port = int(site.url.rsplit(":", 1)[1])
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await _handshake(port, _old_tls_client(pki, ssl.TLSVersion.TLSv1_1))
    assert await _handshake(port, _old_tls_client(pki, ssl.TLSVersion.TLSv1_2)) == "TLSv1.2"


async def test_min_version_tls13_refuses_a_tls_1_2_client(serve: ServeFactory, pki: Pki) -> None:
    site = await serve(TLS + "  min_version: TLS13\n")
    port = int(site.url.rsplit(":", 1)[1])
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await _handshake(port, _old_tls_client(pki, ssl.TLSVersion.TLSv1_2))
    assert await _handshake(port, pki.trust()) == "TLSv1.3"


async def test_mtls_requires_a_client_certificate_signed_by_the_client_ca(
    serve: ServeFactory, pki: Pki
) -> None:
    site = await serve(TLS + "  client_ca_file: ca.crt\n  client_auth_type: RequireAndVerifyClientCert\n")
    port = int(site.url.rsplit(":", 1)[1])
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await _handshake(port, pki.trust())  # no certificate
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await _handshake(port, pki.trust(cert=pki.stranger))  # signed by another CA
    with pytest.raises(aiohttp.ClientError):
        await get(site.url + "/metrics", ssl_context=pki.trust())
    status, _, body = await get(site.url + "/metrics", ssl_context=pki.trust(cert=pki.client))
    assert status == 200 and "devin_up" in body


async def test_a_client_ca_alone_means_client_certificates_are_required(
    serve: ServeFactory, pki: Pki
) -> None:
    site = await serve(TLS + "  client_ca_file: ca.crt\n")  # exporter-toolkit's default
    assert site.config.server.web_config is not None and site.config.server.web_config.tls is not None
    assert site.config.server.web_config.tls.client_auth_type == "RequireAndVerifyClientCert"
    with pytest.raises(aiohttp.ClientError):
        await get(site.url + "/metrics", ssl_context=pki.trust())


async def test_verify_client_cert_if_given_admits_no_cert_but_refuses_a_foreign_one(
    serve: ServeFactory, pki: Pki
) -> None:
    site = await serve(TLS + "  client_ca_file: ca.crt\n  client_auth_type: VerifyClientCertIfGiven\n")
    port = int(site.url.rsplit(":", 1)[1])
    assert (await get(site.url + "/metrics", ssl_context=pki.trust()))[0] == 200
    assert (await get(site.url + "/metrics", ssl_context=pki.trust(cert=pki.client)))[0] == 200
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await _handshake(port, pki.trust(cert=pki.stranger))


# --------------------------------------------------------------------------------------------
# basic auth


AUTH = f"basic_auth_users:\n  prometheus: '{HASH}'\n"


async def test_basic_auth_answers_401_with_a_challenge_unless_the_credentials_are_right(
    serve: ServeFactory,
) -> None:
    site = await serve(AUTH)
    wrong = [
        None,
        ("prometheus", "wrong"),
        ("nobody", PASSWORD),
        ("prometheus", ""),
        ("prometheus", PASSWORD + "x" * 80),  # beyond bcrypt's 72 bytes: 401, not 500
    ]
    for path in ("/metrics", "/", "/readyz"):
        for auth in wrong:
            status, headers, body = await get(site.url + path, auth=auth)
            assert (status, headers.get("WWW-Authenticate")) == (401, CHALLENGE), (path, auth)
            assert "devin_up" not in body and "enterprise" not in body
    for header in ("Basic !!!notbase64", "Basic " + base64.b64encode(b"no-colon").decode(), "Bearer x"):
        status, headers, _ = await get(site.url + "/metrics", headers={"Authorization": header})
        assert (status, headers.get("WWW-Authenticate")) == (401, CHALLENGE), header

    status, _, body = await get(site.url + "/metrics", auth=("prometheus", PASSWORD))
    assert status == 200 and "devin_up" in body


async def test_healthz_stays_open_for_probes_without_credentials(serve: ServeFactory, pki: Pki) -> None:
    site = await serve(AUTH)
    status, headers, body = await get(site.url + "/healthz")
    assert status == 200 and body == "ok\n"
    assert "WWW-Authenticate" not in headers
    # With TLS too: still open, but still HTTPS.
    tls_site = await serve(TLS + AUTH)
    assert (await get(tls_site.url + "/healthz", ssl_context=pki.trust()))[0] == 200
    assert (await get(tls_site.url + "/metrics", ssl_context=pki.trust()))[0] == 401


async def test_a_good_password_is_checked_by_bcrypt_once_then_remembered(
    serve: ServeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[bytes] = []
    real = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(password)
        return real(password, hashed)

    monkeypatch.setattr(webconfig.bcrypt, "checkpw", counting)
    site = await serve(AUTH)
    good = ("prometheus", PASSWORD)
    for _ in range(5):
        assert (await get(site.url + "/metrics", auth=good))[0] == 200
    assert calls == [PASSWORD.encode()]
    # Failures are never remembered as successes, and every one pays the full bcrypt cost.
    for _ in range(2):
        assert (await get(site.url + "/metrics", auth=("prometheus", "nope")))[0] == 401
    assert len(calls) == 3
    assert (await get(site.url + "/metrics", auth=("ghost", "nope")))[0] == 401
    assert len(calls) == 4  # an unknown user costs a bcrypt check too: timing does not reveal names


async def test_tls_and_basic_auth_together(serve: ServeFactory, pki: Pki) -> None:
    site = await serve(TLS + AUTH)
    assert (await get(site.url + "/metrics", ssl_context=pki.trust()))[0] == 401
    status, _, body = await get(site.url + "/metrics", ssl_context=pki.trust(), auth=("prometheus", PASSWORD))
    assert status == 200 and "devin_up" in body


async def test_an_empty_web_config_serves_plain_open_http(serve: ServeFactory) -> None:
    site = await serve("basic_auth_users: {}\nhttp_server_config:\n  http2: false\n")
    assert site.url.startswith("http://")
    assert (await get(site.url + "/metrics"))[0] == 200


# --------------------------------------------------------------------------------------------
# validation


BAD_WEB_CONFIGS = [
    ("tls_server_confg: {}\n", "tls_server_confg", "did you mean 'tls_server_config'?"),
    (TLS + "  cert_fil: server.crt\n", "tls_server_config.cert_fil", "did you mean 'cert_file'?"),
    (
        "tls_server_config:\n  cert_file: missing.crt\n  key_file: server.key\n",
        "tls_server_config.cert_file",
        "missing.crt does not exist",
    ),
    ("tls_server_config:\n  key_file: server.key\n", "tls_server_config.cert_file", "missing"),
    (
        "tls_server_config:\n  cert_file: server.crt\n  key_file: ca.crt\n",
        "tls_server_config.cert_file/key_file",
        "cannot load the certificate and key",
    ),
    (
        TLS + "  client_auth_type: RequireClientCert\n",
        "tls_server_config.client_auth_type",
        "'RequireClientCert' is not one of",
    ),
    (
        TLS + "  client_auth_type: RequireAndVerifyClientCert\n",
        "tls_server_config.client_auth_type",
        "needs client_ca_file",
    ),
    (
        TLS + "  client_ca_file: ca.crt\n  client_auth_type: NoClientCert\n",
        "tls_server_config.client_ca_file",
        "NoClientCert",
    ),
    (TLS + "  client_ca_file: server.key\n", "tls_server_config.client_ca_file", "cannot load"),
    (TLS + "  min_version: TLS11\n", "tls_server_config.min_version", "'TLS11' is not one of TLS12, TLS13"),
    (TLS + "  min_version: TLS13\n  max_version: TLS12\n", "tls_server_config.max_version", "below"),
    (TLS + "  cipher_suites: [TLS_AES_128_GCM_SHA256]\n", "tls_server_config.cipher_suites", "not supported"),
    (TLS + "  client_allowed_sans: [scraper]\n", "tls_server_config.client_allowed_sans", "not supported"),
    ("basic_auth_users:\n  prometheus: hunter2\n", "basic_auth_users.prometheus", "is not a bcrypt hash"),
    ("basic_auth_users:\n  prometheus: '$2b$10$short'\n", "basic_auth_users.prometheus", "not a bcrypt hash"),
    ("basic_auth_users:\n  prometheus: 42\n", "basic_auth_users.prometheus", "must be a string"),
    ("basic_auth_users: [prometheus]\n", "basic_auth_users", "must be a mapping"),
    ("http_server_config:\n  http3: true\n", "http_server_config.http3", "unknown key"),
    ("- just a list\n", "", "must be a mapping"),
    ("tls_server_config: {cert_file: [x\n", "", "invalid YAML"),
]


@pytest.mark.parametrize(("text", "where", "what"), BAD_WEB_CONFIGS)
def test_bad_web_config_is_a_config_error_naming_the_file_and_key(
    text: str, where: str, what: str, pki: Pki, tmp_path: Path
) -> None:
    for name in ("server.crt", "server.key", "ca.crt"):
        (tmp_path / name).write_bytes((pki.dir / name).read_bytes())
    path = tmp_path / "web.yml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_web_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: {where}: " if where else f"{path}: "), message
    assert what in message and "\n" not in message
    # Loading the main config fails the same way: --check-config and SIGHUP see it.
    with pytest.raises(ConfigError) as via_main:
        load_config(write_config(tmp_path, text), env={})
    assert str(via_main.value) == message


def test_a_plain_password_pasted_as_a_hash_is_not_echoed(tmp_path: Path) -> None:
    path = tmp_path / "web.yml"
    path.write_text("basic_auth_users:\n  prometheus: MyS3cretPassw0rd\n")
    with pytest.raises(ConfigError) as caught:
        load_web_config(path)
    assert "MyS3cretPassw0rd" not in str(caught.value)


def test_check_config_exits_2_naming_the_web_config_key(tmp_path: Path, pki: Pki) -> None:
    for name in ("server.crt", "server.key"):
        (tmp_path / name).write_bytes((pki.dir / name).read_bytes())
    config = write_config(tmp_path, TLS + "  client_auth_type: Sometimes\n")
    result = run_cli("--check-config", "--config", str(config))
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert result.stderr == (
        f"devin-usage-exporter: config error: {tmp_path / 'web.yml'}: "
        "tls_server_config.client_auth_type: 'Sometimes' is not one of NoClientCert, "
        "RequestClientCert, VerifyClientCertIfGiven, RequireAnyClientCert, "
        "RequireAndVerifyClientCert\n"
    )
    write_config(tmp_path, TLS + AUTH)
    good = run_cli("--check-config", "--config", str(config))
    assert good.returncode == 0 and good.stdout.startswith(f"{config}: OK:"), good


async def test_reload_with_a_broken_web_config_keeps_serving_with_the_old_one(tmp_path: Path, pki: Pki) -> None:
    for name in ("server.crt", "server.key"):
        (tmp_path / name).write_bytes((pki.dir / name).read_bytes())
    config_path = write_config(tmp_path, TLS)
    exporter = Exporter(load_config(config_path, env={}))
    running = exporter.config
    (tmp_path / "server.crt").unlink()  # say, a certificate rotation gone wrong
    assert await exporter.reload(lambda: load_config(config_path, env={})) is False
    assert exporter.config is running
    assert exporter.reload_status.successful is False


def test_the_daemon_serves_https_with_basic_auth_and_an_open_healthz(tmp_path: Path, pki: Pki) -> None:
    for name in ("server.crt", "server.key"):
        (tmp_path / name).write_bytes((pki.dir / name).read_bytes())
    config = write_config(tmp_path, TLS + AUTH)
    daemon = Daemon("--config", str(config), env=subprocess_env())
    try:
        url = daemon.wait_for(r"msg=listening url=(\S+)").group(1)
        assert url.startswith("https://127.0.0.1:")

        async def check() -> None:
            trust = pki.trust()
            assert (await get(url + "healthz", ssl_context=trust))[0] == 200
            status, headers, _ = await get(url + "metrics", ssl_context=trust)
            assert (status, headers.get("WWW-Authenticate")) == (401, CHALLENGE)
            status, _, body = await get(url + "metrics", ssl_context=trust, auth=("prometheus", PASSWORD))
            assert status == 200 and "devin_up" in body

        asyncio.run(check())
    finally:
        assert daemon.stop() == 0, daemon.text()
    assert "Traceback" not in daemon.text()


def test_a_certificate_replaced_by_garbage_is_reported_with_its_key(tmp_path: Path, pki: Pki) -> None:
    for name in ("server.crt", "server.key"):
        (tmp_path / name).write_bytes((pki.dir / name).read_bytes())
    config = load_config(write_config(tmp_path, TLS), env={})
    (tmp_path / "server.crt").write_text("not a certificate\n")
    # What serve() hits if the file changed after the config was loaded (it then exits 2).
    assert config.server.web_config is not None and config.server.web_config.tls is not None
    with pytest.raises(ConfigError, match=r"tls_server_config\.cert_file/key_file: cannot load"):
        config.server.web_config.tls.ssl_context()
    result = run_cli("--check-config", "--config", str(tmp_path / "config.yaml"))
    assert result.returncode == 2 and "tls_server_config.cert_file/key_file" in result.stderr


def dockerfile_healthcheck_probe() -> str:
    """The Python source the image's HEALTHCHECK runs."""
    dockerfile = (Path(__file__).resolve().parent.parent / "Dockerfile").read_text()
    line = next(x for x in dockerfile.splitlines() if x.strip().startswith('CMD ["python"'))
    probe: str = json.loads(line.strip()[len("CMD "):])[-1]
    return probe


async def test_image_healthcheck_passes_over_tls_with_basic_auth(serve: ServeFactory) -> None:
    """The Dockerfile's HEALTHCHECK must keep working when a web config turns on TLS and auth."""
    probe = dockerfile_healthcheck_probe()
    served = await serve(TLS + AUTH)
    assert served.url.startswith("https://")
    port = served.url.rsplit(":", 1)[1]
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", probe.replace(":9877/", f":{port}/"))
    assert await asyncio.wait_for(process.wait(), timeout=30) == 0
