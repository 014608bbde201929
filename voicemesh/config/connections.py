"""Connection options for NATS and Valkey from the settings: credentials and TLS, used by every role
(Bus.connect, ConfigStore.from_url, the launcher's health checks).

Credentials may also sit in the URLs themselves (nats://user:pass@host, valkey://user:pass@host).
Either way they are secrets: `redact_url` is what goes into a log line or an error message.
"""

from __future__ import annotations

import re
import ssl
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from voicemesh.config.settings import ConnectionSettings

VALKEY_TLS_SCHEMES = ("valkeys", "rediss")
DEFAULT_INBOX = "_INBOX"
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")  # one NATS subject token, no wildcard


def redact_url(url: str | None) -> str:
    """The URL with any password (or token given as the user part) replaced by '***'. A list of
    seeds (`nats://a:4222,nats://b:4222`, `valkey+cluster://u:p@a:1,b:2`) is redacted per seed."""
    if not url:
        return str(url)
    if "," in url:
        return ",".join(redact_url(part) for part in url.split(","))
    try:
        parts = urlsplit(url)
        if parts.username is None and parts.password is None:
            return url
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if parts.port is not None:
            host += f":{parts.port}"
        user = parts.username or ""
        # nats://TOKEN@host carries the token where a user name would be
        auth = f"{user}:***" if parts.password is not None else "***"
        return urlunsplit((parts.scheme, f"{auth}@{host}", parts.path, parts.query, ""))
    except ValueError:
        return "<unparsable url>"


def _check_file(setting: str, path: str) -> str:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ValueError(f"{setting}: cannot read {path} ({exc.strerror})") from None
    return path


def tls_context(
    ca: str | None, cert: str | None, key: str | None, *, what: str = "NATS"
) -> ssl.SSLContext:
    """A client context that verifies the server against `ca` (the system store if unset) and
    presents `cert`/`key` when given (mutual TLS)."""
    up = what.upper()
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH,
        cafile=_check_file(f"VOICEMESH_{up}_TLS_CA", ca) if ca else None,
    )
    if cert and key:
        try:
            ctx.load_cert_chain(
                _check_file(f"VOICEMESH_{up}_TLS_CERT", cert),
                _check_file(f"VOICEMESH_{up}_TLS_KEY", key),
            )
        except ssl.SSLError as exc:
            raise ValueError(
                f"VOICEMESH_{up}_TLS_CERT/KEY: not a usable certificate and key ({exc.reason})"
            ) from None
    return ctx


def inbox_prefix(s: ConnectionSettings) -> str:
    """Where this role's request replies arrive. A NATS user gets inboxes of its own
    (`_INBOX.<user>`): per-role permissions then let a role subscribe to its own replies only,
    not read another role's (voicemesh.bus.permissions)."""
    if s.nats_inbox_prefix:
        return s.nats_inbox_prefix
    if s.nats_user and _TOKEN.fullmatch(s.nats_user):
        return f"{DEFAULT_INBOX}.{s.nats_user}"
    return DEFAULT_INBOX


def nats_options(s: ConnectionSettings) -> dict[str, Any]:
    """Keyword arguments for nats.connect."""
    opts: dict[str, Any] = {}
    if (inbox := inbox_prefix(s)) != DEFAULT_INBOX:
        opts["inbox_prefix"] = inbox
    if s.nats_user:
        opts["user"] = s.nats_user
        if s.nats_password is not None:
            opts["password"] = s.nats_password.get_secret_value()
    if s.nats_token is not None:
        opts["token"] = s.nats_token.get_secret_value()
    if s.nats_creds:
        opts["user_credentials"] = _check_file("VOICEMESH_NATS_CREDS", s.nats_creds)
    if s.nats_tls_ca or s.nats_tls_cert:
        opts["tls"] = tls_context(s.nats_tls_ca, s.nats_tls_cert, s.nats_tls_key, what="nats")
    return opts


def valkey_options(s: ConnectionSettings, url: str) -> dict[str, Any]:
    """Keyword arguments for valkey.Valkey.from_url(url). TLS is chosen by the URL's scheme
    (valkeys:// or rediss://); the TLS files only say how to verify and what to present."""
    opts: dict[str, Any] = {}
    if s.valkey_username:
        opts["username"] = s.valkey_username
    if s.valkey_password is not None:
        opts["password"] = s.valkey_password.get_secret_value()
    files = {
        "ssl_ca_certs": ("VOICEMESH_VALKEY_TLS_CA", s.valkey_tls_ca),
        "ssl_certfile": ("VOICEMESH_VALKEY_TLS_CERT", s.valkey_tls_cert),
        "ssl_keyfile": ("VOICEMESH_VALKEY_TLS_KEY", s.valkey_tls_key),
    }
    given = {k: (name, path) for k, (name, path) in files.items() if path}
    scheme = urlsplit(url).scheme.lower()
    if scheme in VALKEY_TLS_SCHEMES:
        opts["ssl_cert_reqs"] = "required"
        for kwarg, (name, path) in given.items():
            opts[kwarg] = _check_file(name, path)
    elif given:
        names = ", ".join(name for name, _ in given.values())
        raise ValueError(
            f"{names} set but VALKEY_URL is {scheme}://: use valkeys:// (or rediss://) for TLS"
        )
    return opts
