"""Ownership leases in Valkey (SET NX PX + heartbeat) for session-affine streaming work.

A lease names the instance that owns a session's stream on one stage. It lapses by itself when
its holder dies, so the upstream sender can hand the stream to another instance.
"""

from __future__ import annotations

from typing import Any

# KEYS[1] lease; ARGV owner, ttl_ms. Take the lease if free, or renew it if it is already ours.
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return holder
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Leases:
    def __init__(self, client: Any, *, owner: str, ttl_ms: int):
        self.client, self.owner, self.ttl_ms = client, owner, ttl_ms
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    async def acquire(self, key: str) -> str:
        """Take or renew the lease; returns its holder (ours if we got it)."""
        holder = await self._acquire(keys=[key], args=[self.owner, self.ttl_ms])
        return holder.decode() if isinstance(holder, bytes) else str(holder)

    async def renew(self, key: str) -> bool:
        return bool(await self._renew(keys=[key], args=[self.owner, self.ttl_ms]))

    async def release(self, key: str) -> bool:
        return bool(await self._release(keys=[key], args=[self.owner]))

    async def holder(self, key: str) -> str | None:
        value = await self.client.get(key)
        return value.decode() if value else None
