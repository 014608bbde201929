"""The raw baseline hop: a nats-py process that republishes every message from `<src>.<session>`
to `<dst>.<session>` untouched. Three of them in a row are the 4-hop chain voicemesh's loop is
measured against.

    python -m voicemesh.bench.relay NATS_URL SRC_PREFIX DST_PREFIX
"""

from __future__ import annotations

import asyncio
import signal
import sys

import nats
from nats.aio.msg import Msg


async def relay(url: str, src: str, dst: str) -> None:
    nc = await nats.connect(url, name=f"raw-relay-{src}")
    cut = len(src)

    async def forward(msg: Msg) -> None:
        await nc.publish(dst + msg.subject[cut:], msg.data)

    await nc.subscribe(src + ".*", cb=forward, pending_msgs_limit=1_000_000)
    await nc.flush()
    await nc.flush()
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await nc.drain()


if __name__ == "__main__":
    import uvloop

    uvloop.install()
    asyncio.run(relay(*sys.argv[1:4]))
