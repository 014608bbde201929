"""Claims on units of work (an LLM turn, a TTS sentence) so none is lost when an instance dies.

The instance that takes a unit from its queue group claims it in Valkey (SET NX PX, renewed
while it works); when it is done, the claim becomes a "done" note that outlives it. A unit whose
claim is missing some time after it was sent was never finished: its instance died and the
claim lapsed. The transport, which supervises each call's turn, then sends the unit again, and
the LLM resumes after the sentences already sent (kept in a progress list), so nothing is said
twice. A claim held by a live instance makes any duplicate delivery a no-op.
"""

from __future__ import annotations

from typing import Any

import orjson
from valkey.asyncio.cluster import ValkeyCluster

from voicemesh.state.awaited import awaited
from voicemesh.state.keys import Keys

DONE = "done"

# KEYS[1] claim; ARGV owner, ttl_ms
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# KEYS[1] claim; ARGV owner, note, ttl_ms
_FINISH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""
# KEYS[1] claim; ARGV the done note. Only a finished unit is reopened, never a live claim.
_REOPEN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Claims:
    def __init__(
        self,
        client: Any,
        *,
        keys: Keys,
        owner: str,
        ttl_ms: int,
        keep_ms: int = 3_600_000,
    ):
        self.client, self.keys, self.owner = client, keys, owner
        self.ttl_ms, self.keep_ms = ttl_ms, keep_ms
        self.held: set[str] = set()
        self._renew = client.register_script(_RENEW)
        self._finish = client.register_script(_FINISH)
        self._release = client.register_script(_RELEASE)
        self._reopen = client.register_script(_REOPEN)

    def key(self, stage: str, session: str, epoch: int, index: int = 0) -> str:
        return self.keys.claim(stage, session, epoch, index)

    async def take(self, key: str) -> bool:
        """Claim a unit; False if a live instance holds it or it is already done."""
        if await self.client.set(key, self.owner, nx=True, px=self.ttl_ms):
            self.held.add(key)
            return True
        return False

    async def renew_all(self) -> list[str]:
        """Renew every held claim; returns the ones lost. A claim is lost when this instance
        was too slow to renew it (a starved CPU, a long GC pause): it lapsed, and the
        supervisor may already have handed the unit to another instance, so the work under it
        must stop or the caller hears it twice."""
        lost = []
        for key in list(self.held):
            if not await self._renew(keys=[key], args=[self.owner, self.ttl_ms]):
                self.held.discard(key)
                lost.append(key)
        return lost

    async def finish(self, key: str, note: str = DONE) -> None:
        self.held.discard(key)
        await self._finish(keys=[key], args=[self.owner, note, self.keep_ms])

    async def release(self, key: str) -> None:
        """Give the unit up unfinished (cancelled by a newer turn)."""
        self.held.discard(key)
        await self._release(keys=[key], args=[self.owner])

    async def reopen(self, key: str) -> bool:
        """Forget that a unit was finished, so it is done again when sent again: its result was
        lost on the way (the receiver's NATS node died), though the worker did its part."""
        return bool(await self._reopen(keys=[key], args=[DONE]))

    async def state(self, key: str) -> str | None:
        value = await self.client.get(key)
        return value.decode() if value is not None else None

    # --- what an LLM turn has already sent, for a redelivered turn to resume after ------------

    async def add_progress(self, session: str, epoch: int, sentence: str) -> None:
        key = self.keys.progress(session, epoch)
        # one key: a cluster pipeline (no MULTI) sends both to the node holding it
        atomic = not isinstance(self.client, ValkeyCluster)
        async with self.client.pipeline(transaction=atomic) as pipe:
            pipe.rpush(key, orjson.dumps(sentence))
            pipe.pexpire(key, self.keep_ms)
            await pipe.execute()

    async def progress(self, session: str, epoch: int) -> list[str]:
        return [
            orjson.loads(s)
            for s in await awaited(self.client.lrange(self.keys.progress(session, epoch), 0, -1))
        ]
