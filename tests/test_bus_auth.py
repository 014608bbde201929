"""NATS and Valkey want a login, and each role's user may do its own job only (issue 12, item 4).

The suite's shared servers run with the same generated configs as `voicemesh up`'s (conftest.py),
so these tests use them with each role's credentials; the compose files are checked against the
generators and run on the real binaries.
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import time
from pathlib import Path

import nats
import orjson
import pytest
import valkey.asyncio as valkey
import yaml
from nats.errors import Error as NatsError
from valkey.exceptions import NoPermissionError

from tests.conftest import ROOT, Servers
from voicemesh.bus import Bus, Frame, Subjects
from voicemesh.bus.events import Interrupt
from voicemesh.bus.permissions import USERS, nats_config, password_env
from voicemesh.config.settings import Settings
from voicemesh.credentials import ServerCredentials
from voicemesh.servers import free_port, nats_server_binary, valkey_server_binary
from voicemesh.state import ConfigStore
from voicemesh.state.acl import acl_script
from voicemesh.state.acl import password_env as valkey_password_env
from voicemesh.state.keys import Keys


def bare(url: str) -> str:
    """The server's URL without the admin's credentials."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


async def as_user(servers: Servers, user: str) -> tuple[Bus, list[Exception]]:
    """A bus connected as `user`, and the asynchronous errors (permission violations) it got."""
    bus = await Bus.connect(
        bare(servers.nats.url), name=user, settings=servers.creds.settings(user)
    )
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    bus.nc._error_cb = on_error
    return bus, errors


async def test_nats_refuses_a_connection_without_credentials(servers: Servers) -> None:
    with pytest.raises(NatsError, match="Authorization Violation"):
        await nats.connect(bare(servers.nats.url), allow_reconnect=False, max_reconnect_attempts=0)


async def test_valkey_refuses_a_connection_without_credentials(servers: Servers) -> None:
    client = valkey.Valkey.from_url(bare(servers.valkey.url))
    try:
        with pytest.raises(valkey.AuthenticationError):
            await client.set("x", "1")
        with pytest.raises(valkey.AuthenticationError):
            await client.execute_command("AUTH", "default", "")
    finally:
        await client.aclose()


async def test_a_stage_cannot_silence_a_session_on_vm_ctl(servers: Servers, prefix: str) -> None:
    """The attack: any process on the bus publishes `interrupt` with epoch 2^32 on vm.ctl.<sid>,
    and every stage then drops the session's turns. A stage's user gets a permissions violation
    and the frame never arrives; the transport's user still controls the session."""
    subjects = Subjects(prefix)
    listener, _ = await as_user(servers, "llm")  # a stage, as it follows turns
    got: list[str] = []
    sub = await listener.subscribe(subjects.ctl_all, lambda s, f: _note(got, s))
    await listener.settle()
    stt, stt_errors = await as_user(servers, "stt")
    transport, transport_errors = await as_user(servers, "transport")
    try:
        silence = Frame.event(Interrupt(epoch=1 << 32))
        await stt.publish(subjects.ctl("sessionAAAA"), silence)
        await stt.nc.flush()
        await asyncio.sleep(0.3)
        assert got == []
        assert any("permissions violation" in str(e) for e in stt_errors), stt_errors
        await transport.publish(subjects.ctl("sessionBBBB"), silence)
        await transport.nc.flush()
        for _ in range(50):
            if got:
                break
            await asyncio.sleep(0.02)
        assert got == [subjects.ctl("sessionBBBB")] and transport_errors == []
    finally:
        await sub.unsubscribe()
        for b in (listener, stt, transport):
            await b.close()


async def _note(got: list[str], subject: str) -> None:
    got.append(subject)


async def test_a_stage_cannot_forge_another_stages_connector_health(
    servers: Servers, prefix: str
) -> None:
    """The attack: a process marks the llm stage's connector down on the shared health subject,
    and every llm instance skips it. stt may not publish llm's health; llm may."""
    subjects = Subjects(prefix)
    llm, llm_errors = await as_user(servers, "llm")
    news: list[bytes] = []

    async def on_news(msg: nats.aio.msg.Msg) -> None:
        news.append(msg.data)

    await llm.nc.subscribe(subjects.connector_health("llm"), cb=on_news)
    await llm.settle()
    stt, stt_errors = await as_user(servers, "stt")
    try:
        down = orjson.dumps(
            {"state": "down", "stage": "llm", "connector": "openai", "fp": "x", "hold_ms": 60000}
        )
        await stt.nc.publish(subjects.connector_health("llm"), down)
        await stt.nc.flush()
        await asyncio.sleep(0.3)
        assert news == []
        assert any("permissions violation" in str(e) for e in stt_errors), stt_errors
        # nor may it listen to llm's, or answer llm's health ping in its place
        with pytest.raises(Exception, match="ermissions"):
            await stt.nc.subscribe(subjects.health("llm"))
            await stt.nc.flush()
            await asyncio.sleep(0.2)
            if stt_errors[1:]:
                raise stt_errors[-1]
        await llm.nc.publish(subjects.connector_health("llm"), down)
        await llm.nc.flush()
        for _ in range(50):
            if news:
                break
            await asyncio.sleep(0.02)
        assert news == [down] and llm_errors == []
    finally:
        await stt.close()
        await llm.close()


async def test_a_stage_answers_health_as_its_own_user(servers: Servers, prefix: str) -> None:
    """A role's real job under its own user: it subscribes to its health subject, and its reply
    reaches the requester (allow_responses) in the requester's own inbox (_INBOX.<user>)."""
    from tests.support import Services
    from voicemesh.pipeline import LLMService

    settings = Settings(
        nats_url=bare(servers.nats.url),
        valkey_url=bare(servers.valkey.url),
        subject_prefix=prefix,
        key_prefix=prefix,
        preload=False,
        nats_user="llm",
        nats_password=servers.creds.nats["llm"],
        valkey_username="llm",
        valkey_password=servers.creds.valkey["llm"],
    )
    services = Services(settings)
    llm = await services.start(LLMService)
    transport, errors = await as_user(servers, "transport")
    try:
        reply = await transport.nc.request(Subjects(prefix).health("llm"), b"{}", timeout=2)
        assert orjson.loads(reply.data)["role"] == "llm"
        assert errors == []
    finally:
        await transport.close()
        await services.stop(llm)


@pytest.mark.parametrize("where", ["single", pytest.param("cluster", marks=pytest.mark.cluster)])
async def test_a_stages_valkey_user_cannot_flush_configure_or_touch_others_keys(
    servers: Servers, prefix: str, agent_json: dict, where: str, request: pytest.FixtureRequest
) -> None:
    """On a Valkey Cluster too: the role users may read the slot map (what the cluster client
    needs) but change neither the cluster nor another role's keys."""
    from voicemesh.config.models import parse_agent_config

    url = bare(
        servers.valkey.url if where == "single" else request.getfixturevalue("valkey_cluster").url
    )
    transport = ConfigStore.from_url(
        url, settings=servers.creds.settings("transport"), key_prefix=prefix
    )
    stt = ConfigStore.from_url(url, settings=servers.creds.settings("stt"), key_prefix=prefix)
    llm = ConfigStore.from_url(url, settings=servers.creds.settings("llm"), key_prefix=prefix)
    # one node, as the stt user, for the CLUSTER subcommands a cluster client will not route
    host, port = url.partition("://")[2].split(",")[0].split("/")[0].split(":")
    node = valkey.Valkey(
        host=host, port=int(port), username="stt", password=servers.creds.valkey["stt"]
    )
    # a cluster client cannot route a raw SHUTDOWN or ACL (no key to pick a node by)
    raw = stt.client if where == "single" else node
    try:
        sid = (
            await transport.create_session(parse_agent_config(orjson.dumps(agent_json)))
        ).session_id
        # their jobs: read the config; llm writes the context
        assert (await stt.get_config(sid)) is not None
        assert await llm.append_context(sid, {"role": "user", "content": "hi", "epoch": 1}) == 1
        assert await llm.put_reply(sid, 1, {"role": "assistant", "content": "yo"})
        lease = stt.leases(owner="me", ttl_ms=2000)
        assert await lease.acquire(stt.keys.lease("stt", sid)) == "me"
        for attempt in (  # each a coroutine made only when it is tried
            lambda: stt.client.flushall(),
            lambda: stt.client.flushdb(),
            lambda: stt.client.config_set("requirepass", ""),
            lambda: stt.client.config_get("*"),
            lambda: raw.execute_command("SHUTDOWN", "NOSAVE"),
            lambda: raw.execute_command("MODULE", "LIST"),
            lambda: raw.execute_command("ACL", "LIST"),
            lambda: stt.client.keys("*"),
            lambda: llm.client.script_flush(),
            lambda: stt.client.hset(stt.keys.session(sid), "config", "{}"),  # rewrite a session
            lambda: stt.client.set(f"{prefix}:health:llm:openai:x", "down"),  # forge llm's health
            lambda: stt.append_context(sid, {"role": "user", "content": "injected"}),
            lambda: llm.client.set(stt.keys.lease("stt", sid), "evil"),  # steal a stream
            # the cluster itself: no role may fail it over, drop a node or move slots
            lambda: node.execute_command("CLUSTER", "FAILOVER"),
            lambda: node.execute_command("CLUSTER", "FORGET", "0" * 40),
            lambda: node.execute_command("CLUSTER", "SETSLOT", 1, "STABLE"),
        ):
            with pytest.raises(NoPermissionError):
                await attempt()
        assert (await transport.get_context(sid))[0]["content"] == "hi"
        # the transport's own job includes the tenants' call slots, whose scripts read TIME
        from voicemesh.transport.api.tenants import CallSlots, Tenant

        slots = CallSlots(lambda: transport, instance="t1", lease_s=5)
        slot = await slots.acquire(Tenant("acme", admin=False, max_calls=2, session_rate=None))
        await slots.renew(slot)
        assert await slots.count("acme") == 1
        await slots.release(slot)
        assert await slots.count("acme") == 0
    finally:
        for s in (transport, stt, llm):
            await s.close()
        await node.aclose()


def test_generated_files_are_private(tmp_path: Path) -> None:
    creds = ServerCredentials.generate()
    conf = tmp_path / "nats.conf"
    conf.write_text("old")
    conf.chmod(0o644)
    for path in (
        creds.write_nats_config(conf, Subjects()),
        creds.write_valkey_acl(tmp_path / "users.acl", Keys()),
    ):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    acl = (tmp_path / "users.acl").read_text()
    assert all(p not in acl for p in creds.valkey.values())  # hashes only
    assert creds.role_env("stt").keys() == {
        "VOICEMESH_NATS_USER",
        "VOICEMESH_NATS_PASSWORD",
        "VOICEMESH_VALKEY_USERNAME",
        "VOICEMESH_VALKEY_PASSWORD",
    }
    assert creds.role_env("stt")["VOICEMESH_NATS_PASSWORD"] == creds.nats["stt"]
    assert creds.nats["stt"] not in repr(creds) and creds.valkey["stt"] not in repr(creds)


# --- docker-compose ---------------------------------------------------------------------------


def test_compose_files_are_the_generators_output() -> None:
    assert (ROOT / "deploy" / "nats.conf").read_text() == nats_config(Subjects("vm"))
    assert (ROOT / "deploy" / "valkey-start.sh").read_text() == acl_script(Keys("vm"), USERS)


def test_compose_gives_each_role_only_its_own_credentials() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["nats"]["command"][:2] == ["-c", "/etc/voicemesh/nats.conf"]
    assert set(services["nats"]["environment"]) == {password_env(u) for u in USERS}
    assert {valkey_password_env(u) for u in USERS} <= set(services["valkey"]["environment"])
    for role in ("transport", "stt", "llm", "tts"):
        env = services[role]["environment"]
        assert env["VOICEMESH_NATS_USER"] == role and env["VOICEMESH_VALKEY_USERNAME"] == role
        assert env["VOICEMESH_NATS_PASSWORD"].startswith(f"${{{password_env(role)}:?")
        assert env["VOICEMESH_VALKEY_PASSWORD"].startswith(f"${{{valkey_password_env(role)}:?")
        others = [u.upper() for u in USERS if u != role]
        assert not any(o in str(v) for v in env.values() for o in others), env


def loopback(port: int) -> list[str]:
    return ["-a", "127.0.0.1", "-p", str(port)]


def valkey_args(port: int, data: Path) -> list[str]:
    return ["--port", str(port), "--save", "", "--bind", "127.0.0.1", "--dir", str(data)]


def test_compose_server_configs_run_on_the_real_servers(tmp_path: Path) -> None:
    """deploy/nats.conf and deploy/valkey-start.sh with passwords from the environment, as the
    compose file runs them: each role logs in with its own, and no one without."""
    passwords = {u: f"p{os.urandom(12).hex()}-{u}" for u in USERS}
    env = {
        **os.environ,
        **{password_env(u): p for u, p in passwords.items()},
        **{valkey_password_env(u): p for u, p in passwords.items()},
        "VALKEY_ACL_FILE": str(tmp_path / "users.acl"),
        "VALKEY_SERVER": str(valkey_server_binary()),
    }
    nport, vport = free_port(), free_port()
    procs = [
        subprocess.Popen(
            [str(nats_server_binary()), "-c", str(ROOT / "deploy/nats.conf"), *loopback(nport)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            ["sh", str(ROOT / "deploy/valkey-start.sh"), *valkey_args(vport, tmp_path)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
    ]
    creds = ServerCredentials(nats=passwords, valkey=passwords)

    async def check() -> None:
        bus = await Bus.connect(f"nats://127.0.0.1:{nport}", settings=creds.settings("stt"))
        await bus.close()
        store = ConfigStore.from_url(
            f"valkey://127.0.0.1:{vport}/0", settings=creds.settings("stt")
        )
        await store.check()
        with pytest.raises(NoPermissionError):
            await store.client.flushall()
        await store.close()
        with pytest.raises(NatsError, match="Authorization Violation"):
            await nats.connect(
                f"nats://127.0.0.1:{nport}", allow_reconnect=False, max_reconnect_attempts=0
            )

    try:
        time.sleep(0.5)
        assert stat.S_IMODE((tmp_path / "users.acl").stat().st_mode) == 0o600
        asyncio.run(check())
    finally:
        for p in procs:
            p.terminate()
            p.wait(5)

    # a password the nats config or the ACL line could misread is refused at start
    bad = {**env, valkey_password_env("stt"): "has space"}
    run = subprocess.run(
        ["sh", str(ROOT / "deploy/valkey-start.sh")], env=bad, capture_output=True, text=True
    )
    assert run.returncode == 2 and "VALKEY_PASSWORD_STT" in run.stderr
    assert "has space" not in run.stderr
