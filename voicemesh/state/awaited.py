"""Typing help for valkey-py's asyncio client.

valkey-py shares its command mixins between the sync and asyncio clients, so the hash, list and
set commands (hget, lrange, hgetall, smembers...) are typed as returning ``Awaitable[T] | T``.
On ``valkey.asyncio.Valkey`` they always return an awaitable; ``awaited`` says so to the type
checker without changing anything at run time.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar, cast

T = TypeVar("T")


def awaited(reply: Awaitable[T] | T) -> Awaitable[T]:
    """The asyncio client's reply, typed as the awaitable it is (valkey-py's stubs are shared)."""
    return cast(Awaitable[T], reply)
