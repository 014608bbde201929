"""`voicemesh up | serve <role> | call | config ...`"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from voicemesh.config.stages import Stage

DEFAULT_AGENT_FILE = Path("config/agent-config.json")


def _say(msg: str) -> None:
    print(f"voicemesh: {msg}", flush=True)


def _use_uvloop() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover
        pass


# --- serve ----------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from voicemesh.config.logging import setup_logging
    from voicemesh.config.settings import Settings

    overrides: dict[str, Any] = {}
    if args.port is not None:
        overrides["http_port"] = args.port
    settings = Settings(**overrides)
    setup_logging(settings.log_level, settings.log_format, role=args.role, settings=settings)
    if not settings.nats_url or not settings.valkey_url:
        print(
            "voicemesh serve: set NATS_URL and VALKEY_URL (or use `voicemesh up`)", file=sys.stderr
        )
        return 2
    _use_uvloop()
    from voicemesh.bus import BusError
    from voicemesh.state import StoreError

    if args.role == Stage.TRANSPORT:
        import uvicorn

        from voicemesh.transport.api.app import create_app
        from voicemesh.transport.api.limits import uvicorn_config
        from voicemesh.transport.api.security import AuthConfigError
        from voicemesh.transport.api.service import TransportService

        try:
            app = create_app(TransportService(settings))
        except AuthConfigError as exc:
            print(f"voicemesh serve transport: {exc}", file=sys.stderr)
            return 2
        config = uvicorn_config(app, settings, log_level="warning", loop="uvloop")
        server = uvicorn.Server(config)
        asyncio.run(server.serve())
        return 0 if server.started else 3  # startup failed (logged), as uvicorn.run exits

    from voicemesh.connectors.proof import EngineError
    from voicemesh.launcher import ENGINE_FAILED
    from voicemesh.pipeline import SERVICES
    from voicemesh.role import run_role

    async def checked() -> None:
        await _check_valkey(settings)  # a clear error before the stage meets Valkey's refusal
        await run_role(SERVICES[args.role](settings))

    try:
        asyncio.run(checked())
    except (BusError, StoreError) as exc:
        print(f"voicemesh serve {args.role}: {exc}", file=sys.stderr)
        return 1
    except EngineError as exc:  # `up` shows this line; its status tells it not to restart
        print(f"voicemesh serve {args.role}: {exc}", file=sys.stderr, flush=True)
        return ENGINE_FAILED
    return 0


async def _check_valkey(settings: Any) -> None:
    from voicemesh.state.store import ConfigStore

    store = ConfigStore.from_url(settings.valkey_url, settings=settings)
    try:
        await store.check()
    finally:
        await store.close()


# --- up -------------------------------------------------------------------------------------


async def _seed_agent(settings: Any, valkey_url: str, agent_file: Path, conn: Any = None) -> str:
    """`conn`: the connection settings to log in with (default: `settings`)."""
    from voicemesh.config.connections import redact_url
    from voicemesh.config.models import parse_agent_config
    from voicemesh.state.store import ConfigStore

    store = ConfigStore.from_url(
        valkey_url, settings=conn or settings, key_prefix=settings.key_prefix
    )
    try:
        await store.check()
        config = parse_agent_config(await asyncio.to_thread(agent_file.read_bytes))
        record, created = await store.ensure_default_agent(
            "local", config, description=f"from {agent_file}"
        )
        if created:
            return f"default agent {record.name!r} created from {agent_file}"
        return f"default agent is {record.name!r} (kept from {redact_url(valkey_url)})"
    finally:
        await store.close()


def _check_port_free(host: str, port: int) -> None:
    """Refuse a port that uvicorn would refuse, and only that: uvicorn binds with SO_REUSEADDR,
    so the TIME_WAIT sockets a stack stopped a moment ago leaves behind do not count."""
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ValueError(
                f"cannot serve on {host}:{port} ({exc.strerror}); pass --port with a free port"
            ) from None


def _up_auth(env: dict[str, str], settings: Any, host: str, port: int) -> list[str]:
    """`up` is for local use: the API needs no key unless the user gave keys (or asked for auth
    explicitly). Sets VOICEMESH_AUTH in the roles' environment; returns what to tell the user."""
    if "VOICEMESH_AUTH" not in os.environ:
        env["VOICEMESH_AUTH"] = "required" if settings.has_keys else "off"
    if env["VOICEMESH_AUTH"] == "required":
        if not settings.has_keys:
            raise ValueError(
                "VOICEMESH_AUTH=required but VOICEMESH_API_KEYS is empty: set keys, or unset "
                "VOICEMESH_AUTH (`up` is local use: auth off)"
            )
        n = len(settings.api_keys) + len(settings.tenant_keys)
        where = "VOICEMESH_API_KEYS / VOICEMESH_TENANT_KEYS"
        if settings.keys_file:
            where += " or VOICEMESH_KEYS_FILE"
        return [
            f"API auth is on: /api and the call routes need one of the {n} keys in {where} "
            "(Authorization: Bearer KEY; the page asks for it)"
        ]
    notes = ["API auth is off (local use): no key needed. Set VOICEMESH_API_KEYS to require one"]
    if host not in ("127.0.0.1", "localhost", "::1"):
        notes.append(
            f"warning: auth is off and the API listens on {host}:{port}: anyone who can reach "
            "it can start calls and change configs"
        )
    return notes


def cmd_up(args: argparse.Namespace) -> int:
    from voicemesh.bus import BusError, Subjects
    from voicemesh.bus.permissions import ADMIN, nats_config
    from voicemesh.config.connections import redact_url
    from voicemesh.config.settings import Settings
    from voicemesh.credentials import ServerCredentials
    from voicemesh.launcher import ROLES, Stack, StartupError
    from voicemesh.servers import (
        ServerError,
        start_nats,
        start_nats_cluster,
        start_valkey,
        start_valkey_cluster,
    )
    from voicemesh.state import StoreError
    from voicemesh.state.keys import Keys

    settings = Settings()
    args.host = args.host or settings.http_host
    args.port = settings.http_port if args.port is None else args.port
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    servers: list[Any] = []  # EmbeddedServer or ServerCluster: both stop()
    stack: Stack | None = None
    env = dict(os.environ)
    stop = False

    def on_signal(signum: int, _: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        _check_port_free(args.host, args.port)
        auth_notes = _up_auth(env, settings, args.host, args.port)
        # local use: a browser on this host may only reach the transport over loopback
        env.setdefault("VOICEMESH_WEBRTC_LOOPBACK", "1")
        # Embedded servers get a user per role with new random passwords on every run: no other
        # process on this host can drive the bus or read the store, and each role may do only
        # its own job there. An external server keeps the credentials the environment gives.
        creds = ServerCredentials.generate(
            nats=not settings.nats_url, valkey=not settings.valkey_url
        )
        env = creds.scrub(env)
        admin = creds.settings(ADMIN, base=settings)
        if settings.nats_url:
            _say(f"using NATS at {redact_url(settings.nats_url)}")
            nats_url = settings.nats_url
        else:
            t0 = time.monotonic()
            if args.cluster:
                authorization = nats_config(Subjects(settings.subject_prefix), creds.nats)
                nats_cluster = start_nats_cluster(data_dir, base_config=authorization)
                servers.append(nats_cluster)
                nats_url = nats_cluster.url
                what = "a 3-node NATS cluster"
            else:
                conf = creds.write_nats_config(
                    data_dir / "nats.conf", Subjects(settings.subject_prefix)
                )
                nats = start_nats(data_dir, args=["-c", str(conf)])
                servers.append(nats)
                nats_url = nats.url
                what = "nats-server"
            _say(f"started {what} at {nats_url} in {time.monotonic() - t0:.2f} s")
        if settings.valkey_url:
            _say(f"using Valkey at {redact_url(settings.valkey_url)}")
            valkey_url = settings.valkey_url
        else:
            t0 = time.monotonic()
            acl = creds.write_valkey_acl(data_dir / "valkey-users.acl", Keys(settings.key_prefix))
            if args.cluster:
                vk_cluster = start_valkey_cluster(
                    data_dir, args=["--aclfile", str(acl)], admin=(ADMIN, creds.valkey[ADMIN])
                )
                servers.append(vk_cluster)
                valkey_url = vk_cluster.url
                what = "a Valkey Cluster (3 masters, 3 replicas)"
            else:
                vk = start_valkey(data_dir, args=["--aclfile", str(acl)])
                servers.append(vk)
                valkey_url = vk.url
                what = "valkey-server"
            _say(
                f"started {what} at {valkey_url} in {time.monotonic() - t0:.2f} s "
                f"(data in {data_dir})"
            )
        if creds.nats or creds.valkey:
            conf_name = "nats-0.conf" if args.cluster else "nats.conf"
            _say(
                "the embedded servers want a login: one user per role, with new passwords in "
                f"each role's environment (NATS permissions in {data_dir / conf_name})"
            )
        env.update(NATS_URL=nats_url, VALKEY_URL=valkey_url)
        _say(asyncio.run(_seed_agent(settings, valkey_url, Path(args.agent_file), admin)))

        stack = Stack(
            env,
            instances=args.instances,
            http_host=args.host,
            http_port=args.port,
            role_env={role: creds.role_env(role) for role in ROLES},
        )
        stack.start()
        _say(f"starting {', '.join(stack.procs)}; engines load once per process...")
        asyncio.run(
            stack.wait_ready(
                nats_url,
                settings.subject_prefix,
                limit_s=args.startup_timeout,
                progress=_say,
                settings=admin,
            )
        )
        metrics = ", ".join(f"{n} :{p}" for n, p in stack.metrics_ports.items())
        _say(f"Prometheus /metrics: transport :{args.port}, {metrics}")
        for note in auth_notes:
            _say(note)
        _say(
            f"up: web client and API at http://{args.host}:{args.port}/  (API docs /docs; "
            f"calls: WebRTC offers at /api/offer, WebSocket at /ws/call). Ctrl-C stops."
        )
        asyncio.run(stack.supervise(lambda: stop, _say))
        return 0
    except (ServerError, StartupError, BusError, StoreError, OSError, ValueError) as exc:
        _say(f"error: {exc}")
        return 1
    finally:
        if stack is not None:
            _say("stopping services (in-flight turns drain first)...")
            stack.stop()
        for server in reversed(servers):
            server.stop()
        if servers:
            _say("stopped nats-server and valkey-server")


# --- call -----------------------------------------------------------------------------------


def cmd_call(args: argparse.Namespace) -> int:
    import httpx

    from voicemesh.callers.websocket import call_over_websocket

    _use_uvloop()
    common: dict[str, Any] = dict(
        agent=args.agent,
        session_id=args.session,
        turn_timeout=args.timeout,
        api_key=args.api_key or None,
        barge_in_after_s=args.barge_in_after,
    )
    wavs = [Path(w) for w in args.wav]
    for wav in wavs:
        if not wav.is_file():
            print(f"voicemesh call: no such WAV file: {wav}", file=sys.stderr)
            return 2
    try:
        if args.transport == "webrtc":
            from voicemesh.config.logging import route_loguru

            route_loguru()  # before pipecat is imported: it logs a banner on import
            from voicemesh.callers.webrtc import call_over_webrtc

            call = call_over_webrtc(
                args.url, wavs, Path(args.out), jitter_buffer_ms=args.jitter_buffer_ms, **common
            )
        else:
            call = call_over_websocket(args.url, wavs, Path(args.out), **common)
        result = asyncio.run(call)
    except (OSError, RuntimeError, ValueError, TimeoutError, httpx.HTTPError) as exc:
        hint = " (pass --api-key or set VOICEMESH_API_KEY)" if "API key" in str(exc) else ""
        print(f"voicemesh call: {exc}{hint}", file=sys.stderr)
        return 1
    for turn in result.turns:
        print(f"turn {turn.epoch}: you said:  {turn.user_text!r}")
        print(f"         bot said:  {turn.bot_text!r}")
        latency = f"{turn.latency_ms:.0f} ms" if turn.latency_ms is not None else "no reply"
        print(f"         end of speech to first bot audio: {latency}")
        if turn.latency_from_file_end_ms is not None:
            print(
                f"         (from the end of the WAV, after its trailing silence: "
                f"{turn.latency_from_file_end_ms:.0f} ms)"
            )
        if turn.error:
            print(f"         error: {turn.error}")
        if turn.phases:
            parts = [
                f"{k.removesuffix('_ms')} {v:.0f}" for k, v in turn.phases.items() if v is not None
            ]
            print(f"         at the transport (ms): {', '.join(parts)}")
    for cut in result.interrupts:
        print(f"turn {cut['epoch']}: interrupted; the bot had said: {cut['heard']!r}")
    print(f"saved {result.bot_seconds:.1f} s of bot audio to {args.out}")
    return 0 if all(t.latency_ms is not None for t in result.turns) else 1


# --- bench ----------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas: {text!r}"
        ) from None


def cmd_bench(args: argparse.Namespace) -> int:
    from voicemesh.bench.harness import Plan, run
    from voicemesh.bench.report import render_markdown, write_report

    _use_uvloop()
    quick = args.quick
    plan = Plan(
        sessions=args.sessions or ([1, 20] if quick else [1, 50, 200]),
        seconds=args.seconds or (3.0 if quick else 10.0),
        capacity_steps=args.capacity_steps or ([50, 100] if quick else [100, 200, 300, 400, 600]),
        capacity_seconds=3.0 if quick else 5.0,
        switches=args.switches or (4 if quick else 20),
        turns=args.turns or (2 if quick else 5),
        skip=set(args.skip or []),
        voices=args.voices,
    )
    command = "voicemesh bench " + " ".join(sys.argv[2:])
    try:
        report = asyncio.run(run(plan, Path(args.agent_file), command.strip()))
    except (OSError, RuntimeError, ValueError, TimeoutError) as exc:
        print(f"voicemesh bench: {exc}", file=sys.stderr)
        return 1
    paths = write_report(report, Path(args.out))
    print(render_markdown(report))
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    return 0


# --- config ---------------------------------------------------------------------------------


def _api(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        resp = httpx.request(
            method, args.url.rstrip("/") + path, json=body, headers=headers, timeout=10
        )
    except httpx.HTTPError as exc:
        raise SystemExit(f"voicemesh config: cannot reach {args.url}: {exc}") from None
    data = resp.json() if resp.content else {}
    if resp.status_code >= 400:
        detail = data.get("detail")
        if isinstance(detail, list):
            lines = "\n".join(f"  {d.get('path')}: {d.get('msg')}" for d in detail)
            raise SystemExit(f"voicemesh config: rejected ({resp.status_code}):\n{lines}")
        hint = " (pass --api-key or set VOICEMESH_API_KEY)" if resp.status_code == 401 else ""
        raise SystemExit(f"voicemesh config: {resp.status_code}: {detail}{hint}")
    return data


def _print(data: Any) -> None:
    print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


def cmd_config(args: argparse.Namespace) -> int:
    from voicemesh.config.models import (
        ConfigValidationError,
        agent_config_schema,
        parse_agent_config,
    )

    if args.config_cmd == "schema":
        _print(agent_config_schema())
        return 0
    if args.config_cmd == "validate":
        try:
            parse_agent_config(Path(args.file).read_bytes())
        except OSError as exc:
            print(f"{args.file}: {exc}", file=sys.stderr)
            return 1
        except ConfigValidationError as exc:
            print(f"{args.file}: invalid", file=sys.stderr)
            for issue in exc.issues:
                print(f"  {issue.path}: {issue.msg}", file=sys.stderr)
            return 1
        print(f"{args.file}: ok")
        return 0
    if args.config_cmd == "push":
        try:
            config = orjson.loads(Path(args.file).read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            raise SystemExit(f"voicemesh config push: {args.file}: {exc}") from None
        if args.session:
            _print(_api(args, "PUT", f"/api/sessions/{args.session}/config", config))
        elif args.agent:
            existing = _api(args, "GET", "/api/agents")["agents"]
            if any(a["name"] == args.agent for a in existing):
                body = {"config": config, "description": args.description}
                _print(_api(args, "PUT", f"/api/agents/{args.agent}", body))
            else:
                body = {"name": args.agent, "config": config, "description": args.description or ""}
                _print(_api(args, "POST", "/api/agents", body))
            if args.default:
                _print(_api(args, "POST", f"/api/agents/{args.agent}/set-default"))
        else:
            raise SystemExit("voicemesh config push: give --agent NAME or --session ID")
        return 0
    if args.config_cmd == "list":
        data = _api(args, "GET", "/api/agents")
        for a in data["agents"]:
            mark = "*" if a["name"] == data["default"] else " "
            print(f"{mark} {a['name']:<24} v{a['version']:<4} {a['description']}")
        return 0
    if args.config_cmd == "get":
        _print(_api(args, "GET", f"/api/agents/{args.name}"))
        return 0
    if args.config_cmd == "sessions":
        for sid in _api(args, "GET", "/api/sessions")["sessions"]:
            print(sid)
        return 0
    if args.config_cmd == "session":
        _print(_api(args, "GET", f"/api/sessions/{args.id}"))
        return 0
    raise AssertionError(args.config_cmd)


# --- nats-config, valkey-acl ---------------------------------------------------------------


def cmd_nats_config(args: argparse.Namespace) -> int:
    """The NATS users and permissions every role needs, for an operator's own nats-server."""
    from voicemesh.bus import Subjects
    from voicemesh.bus.permissions import nats_config, permissions_table

    subjects = Subjects(args.prefix)
    print(permissions_table(subjects) if args.table else nats_config(subjects), end="")
    return 0


def cmd_valkey_acl(args: argparse.Namespace) -> int:
    """The Valkey ACL users every role needs, for an operator's own valkey-server."""
    from voicemesh.bus.permissions import USERS
    from voicemesh.state.acl import DEFAULT_OFF, acl_script, password_env, rules
    from voicemesh.state.keys import Keys

    keys = Keys(args.key_prefix)
    if args.script:
        print(acl_script(keys, USERS), end="")
        return 0
    print("# Valkey ACL users for voicemesh (voicemesh/state/acl.py). Put each user's password")
    print("# after '>' (or its SHA-256 after '#') and load with --aclfile or ACL LOAD.")
    print(DEFAULT_OFF)
    for user in USERS:
        print(" ".join(("user", user, "on", f">{password_env(user)}", *rules(user, keys))))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """Move the keys of the layout before hash tags to today's (voicemesh.state.migrate)."""
    from voicemesh.config.settings import Settings
    from voicemesh.state.migrate import migrate
    from voicemesh.state.store import ConfigStore, StoreError

    settings = Settings()
    if not settings.valkey_url:
        print("voicemesh migrate: set VALKEY_URL (the store to upgrade)", file=sys.stderr)
        return 2

    async def run() -> str:
        target = ConfigStore.from_url(
            settings.valkey_url or "", settings=settings, key_prefix=settings.key_prefix
        )
        source = (
            ConfigStore.from_url(args.source, settings=settings, key_prefix=settings.key_prefix)
            if args.source
            else target
        )
        try:
            await target.check()
            await source.check()
            done = await migrate(
                source.client, target.client, settings.key_prefix, dry_run=args.dry_run
            )
        finally:
            await target.close()
            if source is not target:
                await source.close()
        for reason in done.skipped:
            print(f"  left: {reason}")
        return ("would have " if args.dry_run else "") + done.summary()

    try:
        print(asyncio.run(run()))
    except StoreError as exc:
        print(f"voicemesh migrate: {exc}", file=sys.stderr)
        return 1
    return 0


# --- parser ---------------------------------------------------------------------------------


def _api_key_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-key",
        default=os.environ.get("VOICEMESH_API_KEY"),
        help="API key of the transport (default: $VOICEMESH_API_KEY; the environment keeps it "
        "out of the process list)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="voicemesh",
        description="Real-time voice pipeline: transport → stt → llm → tts → transport over NATS.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser(
        "up",
        help="start NATS, Valkey (embedded unless NATS_URL/VALKEY_URL are "
        "set) and every role as its own process",
    )
    up.add_argument("--data-dir", default=".voicemesh", help="where embedded servers keep data")
    up.add_argument(
        "--host",
        default=None,
        help="HTTP bind address of the transport (VOICEMESH_HTTP_HOST, 127.0.0.1)",
    )
    up.add_argument(
        "--port",
        type=int,
        default=None,
        help="HTTP port of the transport (VOICEMESH_HTTP_PORT, 8080)",
    )
    up.add_argument("--instances", type=int, default=1, help="instances of each stage")
    up.add_argument(
        "--agent-file",
        default=str(DEFAULT_AGENT_FILE),
        help="config of the default agent, stored when Valkey has none",
    )
    up.add_argument("--startup-timeout", type=float, default=600.0)
    up.add_argument(
        "--cluster",
        action="store_true",
        help="embedded servers as clusters on loopback: 3 nats-server nodes joined by routes, a "
        "Valkey Cluster of 3 masters with a replica each (for trying failover; see "
        "docs/operations.md)",
    )
    up.set_defaults(fn=cmd_up)

    serve = sub.add_parser("serve", help="run one role against external NATS_URL and VALKEY_URL")
    serve.add_argument("role", choices=("transport", "stt", "llm", "tts"))
    serve.add_argument("--port", type=int, default=None, help="HTTP port (transport only)")
    serve.set_defaults(fn=cmd_serve)

    call = sub.add_parser(
        "call", help="call with WAV files over WebRTC (default) or the WebSocket transport"
    )
    call.add_argument(
        "--transport",
        choices=("webrtc", "websocket"),
        default="webrtc",
        help="webrtc: a headless aiortc peer (latency to audible bot audio); websocket: PCM frames",
    )
    call.add_argument(
        "--jitter-buffer-ms",
        type=int,
        default=20,
        help="webrtc: audio this caller buffers before playing (aiortc's default is 80)",
    )
    call.add_argument(
        "--barge-in-after",
        type=float,
        default=None,
        metavar="SECONDS",
        help="say the next WAV this long after the bot starts replying, cutting it off",
    )
    call.add_argument(
        "--wav", action="append", required=True, help="what to say; repeat for several turns"
    )
    call.add_argument("--out", required=True, help="WAV file for the bot's audio")
    call.add_argument("--url", default="http://127.0.0.1:8080")
    who = call.add_mutually_exclusive_group()
    who.add_argument("--agent", help="agent name (default: the default agent)")
    who.add_argument("--session", help="join an existing session")
    call.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each reply")
    _api_key_option(call)
    call.set_defaults(fn=cmd_call)

    bench = sub.add_parser(
        "bench",
        help="latency harness: bus overhead vs raw NATS, capacity, config switch, voice to voice",
    )
    bench.add_argument(
        "--out",
        default="benchmarks/results/bench",
        help="directory for report.md, report.json and the PNG plots",
    )
    bench.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    bench.add_argument(
        "--sessions", type=_ints, help="concurrent sessions per bus run, e.g. 1,50,200"
    )
    bench.add_argument("--seconds", type=float, help="length of each bus run")
    bench.add_argument("--capacity-steps", type=_ints, help="session counts tried for capacity")
    bench.add_argument("--switches", type=int, help="config switches measured")
    bench.add_argument("--turns", type=int, help="turns of the voice-to-voice call")
    bench.add_argument(
        "--voices",
        choices=["shipped", "joe"],
        default="shipped",
        help="the caller's voices: 'shipped' (default), voices the bot was not tuned on "
        "(espeak-ng, flite, festival, human; voicemesh/bench/voices), or 'joe', the bot's own "
        "Piper voice",
    )
    bench.add_argument(
        "--skip",
        action="append",
        choices=["bus", "capacity", "switch", "voice"],
        help="leave a part out (repeatable)",
    )
    bench.add_argument(
        "--agent-file",
        default=str(DEFAULT_AGENT_FILE),
        help="agent with the offline engines, for the voice-to-voice call",
    )
    bench.set_defaults(fn=cmd_bench)

    nc = sub.add_parser(
        "nats-config",
        help="print nats-server's authorization block: a user per role and its permissions "
        "(passwords from $NATS_PASSWORD_<USER>)",
    )
    nc.add_argument("--prefix", default="vm", help="subject prefix (VOICEMESH_SUBJECT_PREFIX)")
    nc.add_argument("--table", action="store_true", help="print the permissions as Markdown")
    nc.set_defaults(fn=cmd_nats_config)

    va = sub.add_parser("valkey-acl", help="print the Valkey ACL users of every role")
    va.add_argument("--key-prefix", default="vm", help="key prefix (VOICEMESH_KEY_PREFIX)")
    va.add_argument(
        "--script",
        action="store_true",
        help="print a sh script that writes the ACL file from $VALKEY_PASSWORD_<USER> and "
        "starts valkey-server (docker-compose's deploy/valkey-start.sh)",
    )
    va.set_defaults(fn=cmd_valkey_acl)

    mig = sub.add_parser(
        "migrate",
        help="move the keys of the layout before Valkey Cluster support to today's (stop the "
        "roles first; safe to run twice)",
    )
    mig.add_argument(
        "--from",
        dest="source",
        default=None,
        help="the old store's URL when it is another server (e.g. a single valkey-server whose "
        "data moves into the cluster of VALKEY_URL); default: VALKEY_URL itself, in place",
    )
    mig.add_argument("--dry-run", action="store_true", help="count, change nothing")
    mig.set_defaults(fn=cmd_migrate)

    cfg = sub.add_parser("config", help="validate, push, list and read configs")
    cfg.add_argument("--url", default="http://127.0.0.1:8080", help="transport API")
    _api_key_option(cfg)
    csub = cfg.add_subparsers(dest="config_cmd", required=True)
    csub.add_parser("schema", help="print the JSON Schema of agent-config.json")
    v = csub.add_parser("validate", help="check a config file")
    v.add_argument("file")
    push = csub.add_parser("push", help="store a config as a named agent or a session's config")
    push.add_argument("file")
    push.add_argument("--agent", help="create or update this agent")
    push.add_argument("--session", help="replace this live session's config")
    push.add_argument("--default", action="store_true", help="make the agent the default")
    push.add_argument("--description", default=None)
    csub.add_parser("list", help="list agents (* marks the default)")
    g = csub.add_parser("get", help="print an agent")
    g.add_argument("name")
    csub.add_parser("sessions", help="list live session ids")
    s = csub.add_parser("session", help="print a session and its config")
    s.add_argument("id")
    cfg.set_defaults(fn=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
