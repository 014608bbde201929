"""Egress by allow-list: the hosts a config may point a connector at.

A config is untrusted, and the processes that run it hold every provider secret: a `base_url`
chosen by a tenant would receive the stage's API key, and a TTS pointed at an internal service
would read that service back to the caller as audio. So every option that names a place to
connect to is declared (`endpoint(...)`) and checked at push time, and again where a stage loads
a config from Valkey and where a connector is built:

- a URL must be https/wss (plain http/ws only for a private host the operator allows), carry no
  userinfo, query or fragment, and name a host on the connector's allow-list: by default the
  provider's official hosts, extended by the operator with VOICEMESH_EGRESS_HOSTS;
- a region is a region name, never a piece of a host name;
- ICE servers are stun:/turn:/turns: URIs with a host; TURN hosts must be listed when a TURN
  credential is configured (the credential goes to them);
- loopback, private (RFC 1918, CGNAT, unique-local v6) hosts and their names (localhost, .local,
  .internal) are refused unless VOICEMESH_EGRESS_PRIVATE is on; link-local (cloud metadata at
  169.254.169.254), unspecified and multicast addresses always.

Hosts are compared after IDNA normalisation and lowercasing; every IP literal form other than
the dotted quad (decimal, octal, hex, short forms) is refused, so no two parsers can disagree
about where a URL leads. Messages never echo a value that could be a secret.

Names on the allow-list are trusted as the operator wrote them: their DNS is not re-checked.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import Any, Literal, cast

import idna
from pydantic import BaseModel, Field

from voicemesh.config.limits import URL_MAX_CHARS
from voicemesh.config.secrets import connectors_declaring
from voicemesh.errors import VoicemeshError

#: the JSON Schema key that marks an egress field: {"kind": "url"|"region"|"ice", "schemes": [...]}
EGRESS_KEY = "x-egress"
HOSTS_SETTING = "VOICEMESH_EGRESS_HOSTS"
PRIVATE_SETTING = "VOICEMESH_EGRESS_PRIVATE"
HOSTS_FORMAT = (
    "[STAGE.]CONNECTOR:HOST[,HOST...][;...] where HOST is name[:port], *.domain or an IP, "
    "e.g. llm.openai:api.groq.com;deepgram:dg.example.com:8443"
)

#: The provider's official hosts, per connector. A pattern "*.x" stands for one label before x.
DEFAULT_HOSTS: dict[str, tuple[str, ...]] = {
    "openai": ("api.openai.com",),
    "anthropic": ("api.anthropic.com",),
    "deepgram": ("api.deepgram.com",),
    "elevenlabs": (
        "api.elevenlabs.io",
        "api.us.elevenlabs.io",
        "api.eu.residency.elevenlabs.io",
        "api.in.residency.elevenlabs.io",
        "api.sg.residency.elevenlabs.io",
    ),
    "azure": ("*.tts.speech.microsoft.com", "*.stt.speech.microsoft.com"),
    "daily": ("*.daily.co",),
    "webrtc": (),  # TURN servers that get a credential: the operator names them
}

MAX_URL = 2048
REGION = re.compile(r"[a-z][a-z0-9]{1,30}")
DEFAULT_PORTS = {"https": 443, "wss": 443, "http": 80, "ws": 80, "turns": 5349}
SECURE = {"https": "http", "wss": "ws"}  # secure scheme -> its plain twin
ICE_SCHEMES = ("stun", "turn", "turns")
ICE_DEFAULT_PORT = {"stun": 3478, "turn": 3478, "turns": 5349}
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_NUMERIC_TLD = re.compile(r"(?:[0-9]+|0x[0-9a-f]*)")
_NETLOC = re.compile(r"(?P<host>\[[^\[\]]*\]|[^:\[\]]+)(?::(?P<port>[0-9]{1,5}))?")
_BAD_CHARS = re.compile(r"[\x00-\x20\x7f\\@#?%<>\"'`^{|}/]")
_PATH_BAD = re.compile(r"[\x00-\x20\x7f\\@#?<>\"'`^{|}]")
#: cloud metadata services by name (their addresses are refused as link-local): never a
#: connector's endpoint, in any mode, since they hand out the machine's own cloud credentials
METADATA_NAMES = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
        "metadata.azure.internal",
        "metadata.tencentyun.com",
    }
)
_PRIVATE_SUFFIXES = (".localhost", ".local", ".internal", ".localdomain", ".home.arpa", ".lan")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_METADATA_V6 = ipaddress.ip_network("fd00:ec2::/64")  # AWS IMDS over IPv6

Kind = Literal["url", "region", "ice"]
HostClass = Literal["public", "private", "never"]


class EgressError(VoicemeshError, ValueError):
    """An option names a place the operator's egress policy does not allow."""


# --- declaring egress fields -----------------------------------------------------------------


def egress_extra(kind: Kind, schemes: tuple[str, ...] = ("https",)) -> dict[str, Any]:
    """The json_schema_extra that marks a field as an egress option."""
    return {EGRESS_KEY: {"kind": kind, "schemes": list(schemes)}}


def endpoint(
    default: Any = None, *, kind: Kind = "url", schemes: tuple[str, ...] = ("https",), **kw: Any
) -> Any:
    """A pydantic Field declared as an egress option: checked against the egress policy at push
    time, at load from Valkey, and when the connector is built. Capped like any URL unless the
    caller says otherwise (a region passes its own, shorter cap)."""
    kw.setdefault("max_length", URL_MAX_CHARS)
    return Field(default, json_schema_extra=egress_extra(kind, schemes), **kw)


@dataclass(frozen=True)
class EgressSpec:
    kind: Kind
    schemes: tuple[str, ...]


@cache
def egress_fields(model: type[BaseModel]) -> dict[str, EgressSpec]:
    """The egress fields an options model declares, by field name."""
    out: dict[str, EgressSpec] = {}
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra
        spec = extra.get(EGRESS_KEY) if isinstance(extra, dict) else None
        if isinstance(spec, dict):
            schemes = spec.get("schemes") or ["https"]
            out[name] = EgressSpec(
                kind=cast(Kind, spec.get("kind", "url")),
                schemes=tuple(str(s) for s in schemes) if isinstance(schemes, list) else (),
            )
    return out


def egress_connectors() -> dict[str, set[str]]:
    """Connector name -> the stages where it has egress options (what VOICEMESH_EGRESS_HOSTS
    may name)."""
    return connectors_declaring(egress_fields)


# --- hosts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    """A normalised host: an ASCII DNS name (lowercase, IDNA) or an IP address."""

    name: str
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None

    def __str__(self) -> str:
        return f"[{self.name}]" if self.ip is not None and self.ip.version == 6 else self.name


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64 or ip in _NAT64_LOCAL:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def ip_class(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> HostClass:
    """'public'; 'private' (loopback, RFC 1918, CGNAT, unique-local: reachable only with
    VOICEMESH_EGRESS_PRIVATE); 'never' (link-local and cloud metadata, unspecified, multicast,
    reserved: no config has a reason to name them)."""
    if isinstance(ip, ipaddress.IPv6Address):
        v4 = _embedded_v4(ip)
        if v4 is not None:
            return ip_class(v4)
        if ip in _METADATA_V6:
            return "never"
    if ip.is_loopback:
        return "private"  # before is_reserved, which ::1 also is
    if ip.is_unspecified or ip.is_link_local or ip.is_multicast or ip.is_reserved:
        return "never"
    if ip.is_private:
        return "private"
    if isinstance(ip, ipaddress.IPv4Address) and ip in ipaddress.IPv4Network("100.64.0.0/10"):
        return "private"  # CGNAT
    return "public" if ip.is_global else "never"


def host_class(host: Host) -> HostClass:
    if host.ip is not None:
        return ip_class(host.ip)
    if host.name in METADATA_NAMES:
        return "never"
    if host.name == "localhost" or host.name.endswith(_PRIVATE_SUFFIXES):
        return "private"
    return "public"


def parse_host(raw: str) -> Host:
    """A host as written in a URL (brackets around IPv6) to its normal form; ValueError with a
    message that does not repeat the input."""
    if not raw or len(raw) > 255:
        raise ValueError("host is empty or too long")
    if raw.startswith("["):
        if not raw.endswith("]") or "%" in raw:
            raise ValueError("malformed IPv6 literal (zone ids are not allowed)")
        try:
            ip6 = ipaddress.IPv6Address(raw[1:-1])
        except ValueError:
            raise ValueError("malformed IPv6 literal") from None
        return Host(str(ip6), ip6)
    if raw.endswith("."):
        raise ValueError("host ends with a dot")
    if any(ord(c) > 127 for c in raw):
        try:
            ascii_host = idna.encode(raw, uts46=True).decode("ascii")
            # refuse what UTS46 mapping changes beyond case (full-width dots, compatibility
            # characters): the host that is checked must be the host that is looked up
            if idna.decode(ascii_host) != raw.lower():
                raise ValueError("host changes under IDNA mapping")
        except idna.IDNAError:
            raise ValueError("host is not a valid internationalised domain name") from None
    else:
        ascii_host = raw.lower()
    labels = ascii_host.split(".")
    if _NUMERIC_TLD.fullmatch(labels[-1]):
        # ends in a number: an IPv4 literal, which must be a plain dotted quad (no decimal,
        # octal, hex or short forms that resolvers read differently)
        try:
            ip4 = ipaddress.IPv4Address(ascii_host)
        except ValueError:
            raise ValueError("IP address literal is not a dotted quad") from None
        return Host(str(ip4), ip4)
    if len(ascii_host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError("host is not a valid DNS name")
    return Host(ascii_host)


@dataclass(frozen=True)
class HostRule:
    """One allow-list entry: an exact host or '*.suffix' (exactly one label), and a port (None:
    the scheme's default port only)."""

    host: str
    port: int | None = None

    def matches(self, host: Host, port: int | None) -> bool:
        if port != self.port:
            return False
        if self.host.startswith("*."):
            suffix = self.host[1:]
            head = host.name[: -len(suffix)] if host.name.endswith(suffix) else ""
            return host.ip is None and bool(head) and "." not in head
        return host.name == self.host

    def __str__(self) -> str:
        return f"{self.host}:{self.port}" if self.port is not None else self.host


def parse_rule(entry: str) -> HostRule:
    entry = entry.strip()
    m = _NETLOC.fullmatch(entry)
    if m is None:
        raise ValueError(f"{entry!r} is not HOST[:PORT]")
    host, port = m.group("host"), m.group("port")
    wildcard = host.startswith("*.")
    parsed = parse_host(host[2:] if wildcard else host)
    if wildcard and parsed.ip is not None:
        raise ValueError(f"{entry!r}: a wildcard needs a domain")
    number = int(port) if port is not None else None
    if number is not None and not 0 < number < 65536:
        raise ValueError(f"{entry!r}: port out of range")
    return HostRule(("*." if wildcard else "") + parsed.name, number)


def parse_egress_hosts(value: str) -> dict[str, tuple[str, ...]]:
    """'llm.openai:a.example,b.example:8443;deepgram:c.example' to
    {'llm.openai': ('a.example', 'b.example:8443'), 'deepgram': ('c.example',)}; the connector
    (and stage) names are checked against the connectors that have egress options."""
    known = egress_connectors()
    out: dict[str, tuple[str, ...]] = {}
    for part in value.split(";"):
        if not part.strip():
            continue
        key, sep, hosts = part.partition(":")
        key = key.strip().lower()
        listed = [h.strip() for h in hosts.split(",") if h.strip()]
        if not sep or not listed:
            raise ValueError(f"{HOSTS_SETTING}: {part.strip()!r} is not {HOSTS_FORMAT}")
        stage, dot, connector = key.rpartition(".")
        if connector not in known or (dot and stage not in known[connector]):
            names = ", ".join(f"{n} ({'/'.join(sorted(s))})" for n, s in sorted(known.items()))
            raise ValueError(
                f"{HOSTS_SETTING}: {key!r} is not a connector with endpoints; known: {names}"
            )
        rules = []
        for entry in listed:
            try:
                rules.append(str(parse_rule(entry)))
            except ValueError as exc:
                raise ValueError(f"{HOSTS_SETTING}: {exc}") from None
        out[key] = tuple(dict.fromkeys((*out.get(key, ()), *rules)))
    return out


# --- the policy ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EgressPolicy:
    """Hosts per connector (defaults plus the operator's), and whether private hosts are
    reachable."""

    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    private: bool = False

    def rules(self, stage: str, connector: str) -> tuple[HostRule, ...]:
        entries = (
            *DEFAULT_HOSTS.get(connector, ()),
            *self.extra.get(connector, ()),
            *self.extra.get(f"{stage}.{connector}", ()),
        )
        return _rules(tuple(dict.fromkeys(entries)))

    def allowed_text(self, stage: str, connector: str) -> str:
        rules = self.rules(stage, connector)
        return ", ".join(str(r) for r in rules) or "none"


@cache
def _rules(entries: tuple[str, ...]) -> tuple[HostRule, ...]:
    return tuple(parse_rule(e) for e in entries)


def current_policy() -> EgressPolicy:
    """The operator's policy as the environment says now, so a stage and the transport apply the
    same rule to the same config. Built once per distinct value of its two variables: a
    pydantic-settings read costs ~100 µs, and every config validated (each session created)
    asks for it."""
    env = os.environ
    return _policy(env.get(HOSTS_SETTING), env.get(PRIVATE_SETTING))


@lru_cache(maxsize=8)
def _policy(hosts: str | None, private: str | None) -> EgressPolicy:
    from voicemesh.config.settings import EgressSettings

    s = EgressSettings()
    return EgressPolicy(extra=s.egress_hosts, private=s.egress_private)


# --- checks ----------------------------------------------------------------------------------


def _private_problem(host: Host, policy: EgressPolicy) -> str | None:
    cls = host_class(host)
    if cls == "never":
        return "link-local, metadata, unspecified, multicast and reserved addresses are refused"
    if cls == "private" and not policy.private:
        return (
            "loopback and private hosts are refused (an operator allows them with "
            f"{PRIVATE_SETTING}=on)"
        )
    return None


def _allowed(
    host: Host, port: int | None, stage: str, connector: str, policy: EgressPolicy, show: bool
) -> str | None:
    """None when `host` (and `port`, None for the scheme's default) may be reached."""
    if problem := _private_problem(host, policy):
        return problem
    if host_class(host) == "private":
        return None  # the operator allows private hosts: any of them, any port
    if any(rule.matches(host, port) for rule in policy.rules(stage, connector)):
        return None
    what = f"host {host}{f':{port}' if port is not None else ''}" if show else "host"
    return (
        f"{what} is not on the egress allow-list of the {stage} connector {connector!r}; "
        f"allowed: {policy.allowed_text(stage, connector)} (an operator adds hosts with "
        f"{HOSTS_SETTING})"
    )


def url_problem(
    value: str,
    stage: str,
    connector: str,
    schemes: Iterable[str],
    policy: EgressPolicy,
    *,
    show: bool = True,
) -> str | None:
    """Why a URL may not be used by this connector, or None. `show` False: the message does
    not name the host either (the field may hold a secret)."""
    if len(value) > MAX_URL:
        return f"URL longer than {MAX_URL} characters"
    if any(ord(c) > 127 for c in value.partition("://")[2].partition("/")[2]):
        return "the path must be ASCII (percent-encode it)"
    scheme, sep, rest = value.partition("://")
    scheme = scheme.lower()
    allowed = tuple(schemes)
    plain = tuple(SECURE[s] for s in allowed if s in SECURE)
    if not sep or scheme not in (*allowed, *plain):
        return f"must be a URL with scheme {' or '.join(allowed)}"
    netloc, _, path = rest.partition("/")
    if "@" in netloc:
        return "userinfo (user:password@) is not allowed in a URL"
    if _BAD_CHARS.search(netloc):
        return "the host part has characters that are not allowed (spaces, \\, %, ?, # ...)"
    if _PATH_BAD.search(path):
        return "query strings, fragments, '@', '\\' and spaces are not allowed in a URL"
    found = host_and_port(netloc, "the host part is not HOST[:PORT]")
    if isinstance(found, str):
        return found
    host, port = found
    if port == DEFAULT_PORTS.get(scheme):
        port = None
    if problem := _allowed(host, port, stage, connector, policy, show):
        return problem
    if scheme in plain and host_class(host) != "private":
        return f"plain {scheme}:// only for a private host the operator allows; use {scheme}s://"
    return None


def host_and_port(netloc: str, malformed: str) -> tuple[Host, int | None] | str:
    """HOST[:PORT] of a URL or an ICE URI, normalised, or what is wrong with it (`malformed`
    when it is not that shape at all)."""
    m = _NETLOC.fullmatch(netloc)
    if m is None:
        return malformed
    try:
        host = parse_host(m.group("host"))
    except ValueError as exc:
        return str(exc)
    port = int(m.group("port")) if m.group("port") is not None else None
    if port is not None and not 0 < port < 65536:
        return "port out of range"
    return host, port


def region_problem(value: str) -> str | None:
    if REGION.fullmatch(value) is None:
        return "must be a region name such as westeurope (lowercase letters and digits)"
    return None


def ice_problem(
    value: str,
    stage: str,
    connector: str,
    policy: EgressPolicy,
    *,
    with_credential: bool,
) -> str | None:
    """A STUN/TURN URI (RFC 7064/7065): stun:host[:port], turn(s):host[:port][?transport=udp|tcp].
    TURN hosts get the TURN credential: when one is configured they must be on the allow-list."""
    if len(value) > 512:
        return "ICE server URI longer than 512 characters"
    scheme, sep, rest = value.partition(":")
    scheme = scheme.lower()
    if not sep or scheme not in ICE_SCHEMES:
        return f"must be a {', '.join(s + ':' for s in ICE_SCHEMES)} URI with a host"
    netloc, q, query = rest.partition("?")
    if q and query.lower() not in ("transport=udp", "transport=tcp"):
        return "the only query allowed is ?transport=udp or ?transport=tcp"
    if netloc.startswith("//") or "@" in netloc or _BAD_CHARS.search(netloc):
        return "must be scheme:host[:port] (no //, userinfo or special characters)"
    found = host_and_port(netloc, "must be scheme:host[:port]")
    if isinstance(found, str):
        return found
    host, port = found
    if problem := _private_problem(host, policy):
        return problem
    if scheme != "stun" and with_credential and host_class(host) != "private":
        default = ICE_DEFAULT_PORT[scheme]
        # the default port may be written or left out, in the URI and in the allow-list alike
        ports = (None, default) if port in (None, default) else (port,)
        problems = [_allowed(host, p, stage, connector, policy, True) for p in ports]
        return None if None in problems else problems[-1]
    return None


def egress_issues(
    stage: str,
    connector: str,
    model: type[BaseModel],
    options: Mapping[str, Any],
    policy: EgressPolicy | None = None,
) -> list[tuple[tuple[str | int, ...], str]]:
    """(path within the options, message) for every egress option the policy refuses. Values
    that are "${ENV}" references are the operator's and are checked where they are resolved."""
    from voicemesh.config.secrets import SECRET_REF, credential_fields

    fields = egress_fields(model)
    if not fields:
        return []
    policy = policy if policy is not None else current_policy()
    creds = credential_fields(model)
    issues: list[tuple[tuple[str | int, ...], str]] = []
    for name, spec in fields.items():
        value = options.get(name)
        if value is None or value == []:
            continue
        if value == "" and model.model_fields[name].default == "":
            continue  # "" is that field's "not set" (a room URL given per call instead)
        if spec.kind == "ice":
            if not isinstance(value, list):
                continue  # a type error the options model reports
            with_credential = any(bool(options.get(c)) for c in creds)
            for i, item in enumerate(value):
                if isinstance(item, str):
                    if problem := ice_problem(
                        item, stage, connector, policy, with_credential=with_credential
                    ):
                        issues.append(((name, i), problem))
            continue
        if not isinstance(value, str) or SECRET_REF.fullmatch(value):
            continue
        if spec.kind == "region":
            problem = region_problem(value)
        else:
            problem = url_problem(
                value, stage, connector, spec.schemes, policy, show=name not in creds
            )
        if problem:
            issues.append(((name,), problem))
    return issues


def check_egress(
    stage: str, connector: str, options: BaseModel, policy: EgressPolicy | None = None
) -> None:
    """Raise EgressError for the first option the policy refuses (at connector build time: a
    config that reached a stage some other way still cannot send a secret elsewhere)."""
    issues = egress_issues(stage, connector, type(options), options.model_dump(), policy)
    if issues:
        path, msg = issues[0]
        where = ".".join(str(p) for p in path)
        raise EgressError(f"{stage} connector {connector!r} option {where}: {msg}")
