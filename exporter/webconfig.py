"""The `server.web_config_file` (Prometheus exporter-toolkit format): TLS and basic auth for our endpoints."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
import re
import ssl
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import bcrypt
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from exporter.yamldoc import ConfigError, Node, parse_yaml, read_text

__all__ = [
    "AUTH_REALM",
    "CLIENT_AUTH_TYPES",
    "OPEN_PATHS",
    "BasicAuth",
    "TlsSettings",
    "WebConfig",
    "load_web_config",
    "parse_web_config",
]

AUTH_REALM: Final = "devin-usage-exporter"
# Liveness probes (kubelet, Docker HEALTHCHECK) carry no credentials; /healthz reveals nothing.
OPEN_PATHS: Final = frozenset({"/healthz"})

# exporter-toolkit's names. Python's ssl module cannot ask for a client certificate without
# verifying it against a CA, so the two "request/require any" types verify too (documented).
CLIENT_AUTH_TYPES: Final = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
# TLS 1.0 and 1.1 are deprecated (RFC 8996); accepting them would only weaken the endpoint.
TLS_VERSIONS: Final = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}

_TOP_KEYS: Final = ("tls_server_config", "http_server_config", "basic_auth_users")
_TLS_KEYS: Final = (
    "cert_file",
    "key_file",
    "client_ca_file",
    "client_auth_type",
    "min_version",
    "max_version",
)
# exporter-toolkit keys this exporter cannot honour. Refused rather than ignored: a config that
# restricts client SANs or cipher suites must not silently run without the restriction.
_UNSUPPORTED_TLS_KEYS: Final = (
    "cipher_suites",
    "curve_preferences",
    "prefer_server_cipher_suites",
    "client_allowed_sans",
    "cert",
    "key",
)
_HTTP_KEYS: Final = ("http2", "headers")
_BCRYPT_RE: Final = re.compile(r"^\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}$")
_BCRYPT_MAX_PASSWORD: Final = 72  # bytes; bcrypt ignores (bcrypt>=5: rejects) anything longer
# Successful (user, password) checks remembered, so a scrape every 15 s does not pay bcrypt's
# ~50-250 ms of CPU each time. Few clients scrape an exporter; the bound only stops misuse.
_CACHE_SIZE: Final = 64
# Concurrent bcrypt checks; a flood of wrong passwords must not take every executor thread
# (aiohttp's DNS resolution for the poller runs there too).
_MAX_CONCURRENT_CHECKS: Final = 2


@dataclass(frozen=True)
class TlsSettings:
    """`tls_server_config`: paths resolved against the web config file's folder."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None
    client_auth_type: str = "NoClientCert"
    min_version: str = "TLS12"
    max_version: str | None = None
    source: str = "<web config>"

    def ssl_context(self) -> ssl.SSLContext:
        """A server context; raises ConfigError naming the key whose file is unusable."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = TLS_VERSIONS[self.min_version]
        if self.max_version is not None:
            context.maximum_version = TLS_VERSIONS[self.max_version]
        context.options |= ssl.OP_NO_COMPRESSION
        where = "tls_server_config"
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
        except FileNotFoundError as exc:
            key = "cert_file" if not Path(self.cert_file).is_file() else "key_file"
            raise ConfigError(
                f"{self.source}: {where}.{key}: cannot read {exc.filename}: {exc.strerror}"
            ) from None
        except OSError as exc:  # ssl.SSLError is an OSError
            raise ConfigError(
                f"{self.source}: {where}.cert_file/key_file: cannot load the certificate "
                f"and key ({_ssl_reason(exc)}); are they PEM and do they belong together?"
            ) from None
        if self.client_ca_file is not None:
            try:
                context.load_verify_locations(cafile=self.client_ca_file)
            except OSError as exc:
                raise ConfigError(
                    f"{self.source}: {where}.client_ca_file: cannot load "
                    f"{self.client_ca_file}: {_ssl_reason(exc)}"
                ) from None
        context.verify_mode = CLIENT_AUTH_TYPES[self.client_auth_type]
        return context


@dataclass(frozen=True)
class WebConfig:
    """The parsed web config file: no TLS and no users means plain, open HTTP (as exporter-toolkit)."""

    source: str
    tls: TlsSettings | None = None
    # (user, bcrypt hash), sorted by user; kept out of repr so config dumps do not carry hashes
    basic_auth_users: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    def middlewares(self) -> list[Middleware]:
        return [BasicAuth(self.basic_auth_users).middleware] if self.basic_auth_users else []


def _ssl_reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or exc.strerror or type(exc).__name__
    return exc.strerror or str(exc)


# --- parsing ----------------------------------------------------------------------------------


def _file(node: Node, base_dir: Path) -> str:
    path = base_dir / node.string()
    if not path.is_file():
        node.fail(f"{path} does not exist or is not a file")
    if not os.access(path, os.R_OK):
        node.fail(f"{path} is not readable")
    return str(path)


def _choice(node: Node, choices: tuple[str, ...]) -> str:
    value = node.string()
    if value not in choices:
        node.fail(f"{value!r} is not one of {', '.join(choices)}")
    return value


def _tls(node: Node, base_dir: Path) -> TlsSettings:
    if isinstance(node.value, dict):
        for key in _UNSUPPORTED_TLS_KEYS:
            if key in node.value:
                node.child(key, None).fail(
                    "is not supported by this exporter (Python's TLS stack); remove it"
                    + ("; use cert_file" if key == "cert" else "; use key_file" if key == "key" else "")
                )
    keys = node.mapping(_TLS_KEYS)
    for required in ("cert_file", "key_file"):
        if required not in keys:
            node.child(required, None).fail("missing: TLS needs both cert_file and key_file")
    ca = _file(keys["client_ca_file"], base_dir) if "client_ca_file" in keys else None
    if "client_auth_type" in keys:
        auth_type = _choice(keys["client_auth_type"], tuple(CLIENT_AUTH_TYPES))
    else:
        # exporter-toolkit's default: a CA file alone means client certificates are required.
        auth_type = "RequireAndVerifyClientCert" if ca else "NoClientCert"
    if auth_type == "NoClientCert" and ca is not None:
        keys["client_ca_file"].fail(
            "set, but client_auth_type is NoClientCert; set a client_auth_type "
            "such as RequireAndVerifyClientCert, or remove client_ca_file"
        )
    if auth_type != "NoClientCert" and ca is None:
        keys["client_auth_type"].fail(
            f"{auth_type} needs client_ca_file (the CA that signs client certificates)"
        )
    versions = tuple(TLS_VERSIONS)
    low = _choice(keys["min_version"], versions) if "min_version" in keys else "TLS12"
    high = _choice(keys["max_version"], versions) if "max_version" in keys else None
    if high is not None and TLS_VERSIONS[high] < TLS_VERSIONS[low]:
        keys["max_version"].fail(f"{high} is below min_version {low}")
    tls = TlsSettings(
        cert_file=_file(keys["cert_file"], base_dir),
        key_file=_file(keys["key_file"], base_dir),
        client_ca_file=ca,
        client_auth_type=auth_type,
        min_version=low,
        max_version=high,
        source=node.source,
    )
    tls.ssl_context()  # loads every file now, so a bad certificate fails --check-config, not start-up
    return tls


def _http(node: Node) -> None:
    # Accepted so a file shared with other exporters loads; HTTP/2 and custom response headers
    # are not implemented (aiohttp serves HTTP/1.1), so the values are checked for shape only.
    keys = node.mapping(_HTTP_KEYS)
    if "http2" in keys and not isinstance(keys["http2"].value, bool):
        keys["http2"].fail("must be true or false")
    if "headers" in keys and not isinstance(keys["headers"].value, (dict, type(None))):
        keys["headers"].fail("must be a mapping of header name to value")


def _users(node: Node) -> tuple[tuple[str, str], ...]:
    users: list[tuple[str, str]] = []
    for name, child in node.entries("user name to bcrypt hash"):
        if not isinstance(name, str) or not name or ":" in name:
            child.fail(f"{name!r} is not a user name (a non-empty string without ':')")
        hashed = child.string()
        match = _BCRYPT_RE.match(hashed)
        # Not echoed: it is a password hash. A plain password pasted here must not reach the log.
        if match is None:
            child.fail(
                "is not a bcrypt hash ($2y$10$ followed by 53 characters); "
                "make one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`"
            )
        if not 4 <= int(match.group(1)) <= 31:
            child.fail("bcrypt cost must be between 04 and 31")
        users.append((name, hashed))
    return tuple(sorted(users))


def parse_web_config(text: str, source: str, *, base_dir: Path | None = None) -> WebConfig:
    """Parse and validate a web config document; ConfigError names `source` and the key path."""
    base_dir = Path(".") if base_dir is None else base_dir
    try:
        root = Node(parse_yaml(text, source), "", source)
        keys = root.mapping(_TOP_KEYS)
        if "http_server_config" in keys:
            _http(keys["http_server_config"])
        tls_node = keys.get("tls_server_config")
        tls = _tls(tls_node, base_dir) if tls_node is not None and tls_node.value is not None else None
        users = _users(keys["basic_auth_users"]) if "basic_auth_users" in keys else ()
    except RecursionError:
        raise ConfigError(f"{source}: invalid YAML: nested too deeply") from None
    return WebConfig(source=source, tls=tls, basic_auth_users=users)


def load_web_config(path: str | os.PathLike[str]) -> WebConfig:
    """Read and validate the web config at `path`; relative paths in it resolve from its folder."""
    file = Path(path)
    return parse_web_config(read_text(file, "web config"), str(file), base_dir=file.parent)


# --- basic auth -------------------------------------------------------------------------------


def _unauthorized() -> web.Response:
    return web.Response(
        status=401, text="401 Unauthorized\n", headers={"WWW-Authenticate": f'Basic realm="{AUTH_REALM}"'}
    )


def _credentials(header: str) -> tuple[str, str] | None:
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic" or not token:
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        return bool(bcrypt.checkpw(password, hashed))
    except ValueError:  # a hash the regex let through but bcrypt cannot read: a 401, not a 500
        return False


class BasicAuth:
    """Checks `Authorization: Basic` against bcrypt hashes, remembering successes."""

    def __init__(self, users: tuple[tuple[str, str], ...]) -> None:
        self._users = dict(users)
        # Any valid hash works: checked against it, an unknown user costs the same time as a
        # known one, so response times do not tell which user names exist.
        self._decoy = users[0][1].encode() if users else bcrypt.hashpw(b"decoy", bcrypt.gensalt(4))
        # Cache keys are salted digests, so the cache never holds anything a password can be
        # recovered from faster than from the bcrypt hashes themselves.
        self._salt = os.urandom(16)
        self._ok: OrderedDict[bytes, None] = OrderedDict()
        self._checks: asyncio.Semaphore | None = None

    def _digest(self, user: str, password: str, hashed: bytes) -> bytes:
        material = b"\0".join((user.encode(), password.encode(), hashed))
        return hmac.new(self._salt, material, hashlib.sha256).digest()

    async def verify(self, user: str, password: str) -> bool:
        known = next(
            (h for u, h in self._users.items() if hmac.compare_digest(u.encode(), user.encode())), None
        )
        hashed = known.encode() if known is not None else self._decoy
        digest = self._digest(user, password, hashed)
        if known is not None and digest in self._ok:
            self._ok.move_to_end(digest)
            return True
        secret = password.encode()
        if len(secret) > _BCRYPT_MAX_PASSWORD:
            return False  # bcrypt>=5 raises on these; no stored hash can match one anyway
        if self._checks is None:
            self._checks = asyncio.Semaphore(_MAX_CONCURRENT_CHECKS)
        async with self._checks:
            # bcrypt takes tens to hundreds of ms by design: off the event loop, or every
            # scrape and poll would stall behind it.
            ok = await asyncio.to_thread(_checkpw, secret, hashed)
        if ok and known is not None:
            self._ok[digest] = None
            while len(self._ok) > _CACHE_SIZE:
                self._ok.popitem(last=False)
            return True
        return False

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        credentials = _credentials(request.headers.get("Authorization", ""))
        if credentials is None or not await self.verify(*credentials):
            return _unauthorized()
        return await handler(request)
