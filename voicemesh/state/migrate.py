"""`voicemesh migrate`: move a deployment's keys from the layout before hash tags
(voicemesh.state.keys.LegacyKeys) to today's, in place or from a single server into a Valkey
Cluster, so an upgrade keeps its agents and live sessions.

Each key is copied with DUMP and RESTORE (any type, byte for byte) with its remaining TTL, so a
session lapses when it would have; a key that already exists under its new name is left alone
(something wrote it after the upgrade: it is newer). The old key is deleted once its copy is in
place, so a second run finds nothing to do. Leases are not copied: they last seconds and the
new roles take new ones; claims and progress lists are, so a turn finished before the upgrade
is not spoken again.

Run it with the roles stopped (they would write the old names meanwhile): stop, migrate, start.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from voicemesh.state.keys import AGENT_NAME, SESSION_ID, Keys, LegacyKeys


@dataclass
class Migration:
    sessions: int = 0
    contexts: int = 0
    agents: int = 0
    claims: int = 0
    skipped: list[str] = field(default_factory=list)  # old keys left as they were, and why

    def summary(self) -> str:
        text = (
            f"migrated {self.sessions} sessions ({self.contexts} with context), "
            f"{self.agents} agents, {self.claims} claims and progress lists"
        )
        if self.skipped:
            text += f"; left {len(self.skipped)} keys as they were"
        return text


async def _move(source: Any, target: Any, old: str, new: str, *, dry_run: bool) -> bool | None:
    """Copy `old` (on source) to `new` (on target) with its TTL, then delete `old`. None: `old`
    is gone (lapsed meanwhile); False: `new` exists already, `old` kept."""
    payload = await source.dump(old)
    if payload is None:
        return None
    ttl = int(await source.pttl(old))
    if ttl == -2:
        return None
    if await target.exists(new):
        return False
    if dry_run:
        return True
    # RESTORE with ttl 0 means no TTL (agents); a key about to lapse keeps at least 1 ms
    await target.restore(new, max(ttl, 1) if ttl > 0 else 0, payload)
    await source.delete(old)
    return True


async def migrate(source: Any, target: Any, prefix: str, *, dry_run: bool = False) -> Migration:
    """Move `prefix`'s old keys on `source` to the new layout on `target` (the same client for
    an in-place upgrade)."""
    old, new, done = LegacyKeys(prefix), Keys(prefix), Migration()

    # sessions: the old index names them all (and a scan finds any it missed)
    ids: set[str] = (
        {i.decode() for i in await source.zrange(old.sessions, 0, -1)}
        if await source.type(old.sessions) == b"zset"
        else set()
    )
    async for key in source.scan_iter(match=old.session("*"), count=500):
        sid = key.decode().removeprefix(old.session(""))
        if SESSION_ID.fullmatch(sid):
            ids.add(sid)
    for sid in sorted(ids):
        if not SESSION_ID.fullmatch(sid):
            done.skipped.append(f"{old.session(sid)}: not a session id")
            continue
        ttl = int(await source.pttl(old.session(sid)))
        if ttl == -2:
            continue  # lapsed: nothing to keep
        if not dry_run and ttl > 0:  # index first, as the store does (keys.py)
            await target.zadd(new.sessions_of(sid), {sid: int(time.time() * 1000) + ttl})
        moved = await _move(source, target, old.session(sid), new.session(sid), dry_run=dry_run)
        if moved is False:
            done.skipped.append(f"{old.session(sid)}: {new.session(sid)} exists")
            continue
        done.sessions += bool(moved)
        ctx = await _move(source, target, old.context(sid), new.context(sid), dry_run=dry_run)
        done.contexts += bool(ctx)
    if not dry_run:
        await source.delete(old.sessions)

    # agents: the global catalogue, then each tenant's own
    tenants = sorted(t.decode() for t in await source.smembers(old.agent_tenants))
    for tenant in [None, *tenants]:
        for raw in sorted(await source.smembers(old.agent_names(tenant))):
            name = raw.decode()
            if not AGENT_NAME.fullmatch(name):
                done.skipped.append(f"{old.agent(name, tenant)}: not an agent name")
                continue
            moved = await _move(
                source, target, old.agent(name, tenant), new.agent(name, tenant), dry_run=dry_run
            )
            if moved is None:
                continue
            if moved is False:
                done.skipped.append(f"{old.agent(name, tenant)}: {new.agent(name, tenant)} exists")
            done.agents += bool(moved)
            if not dry_run:
                await target.sadd(new.agent_names(tenant), name)
        default = await source.get(old.default_of(tenant))
        if not dry_run:
            if default is not None:
                await target.set(new.default_of(tenant), default, nx=True)
            if tenant is not None:
                await target.sadd(new.agent_tenants, tenant)
            await source.delete(old.agent_names(tenant), old.default_of(tenant))
    if not dry_run:
        await source.delete(old.agent_tenants)

    # claims and progress lists: `claim:STAGE:SID:EPOCH:INDEX`, `progress:SID:EPOCH`
    for pattern in (old.claim_pattern(), old.progress_pattern()):
        async for key in source.scan_iter(match=pattern, count=500):
            name = key.decode()
            parts = name.removeprefix(f"{prefix}:").split(":")
            if "{" in name:
                continue  # already the new layout
            if parts[0] == "claim" and len(parts) == 5 and SESSION_ID.fullmatch(parts[2]):
                target_key = new.claim(parts[1], parts[2], int(parts[3]), int(parts[4]))
            elif parts[0] == "progress" and len(parts) == 3 and SESSION_ID.fullmatch(parts[1]):
                target_key = new.progress(parts[1], int(parts[2]))
            else:
                done.skipped.append(f"{name}: not a claim or progress list")
                continue
            done.claims += bool(await _move(source, target, name, target_key, dry_run=dry_run))
    return done
