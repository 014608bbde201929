"""A NATS tool service for the agent in weather-agent.json: `get_weather(city)`.

    NATS_URL=nats://127.0.0.1:4222 python examples/weather_tool.py

Start as many copies as you like: they share the queue group, so each call goes to one of them.
The forecast is made up (no network); a real service would call a weather API here.
"""

from __future__ import annotations

import asyncio
import os
import zlib

import nats

import voicemesh.tools

FORECASTS = ("sunny", "cloudy", "rainy", "windy", "snowy")


async def get_weather(city: str) -> dict[str, object]:
    call = voicemesh.tools.current_call()  # idempotency key, session and epoch of this call
    seed = zlib.crc32(city.lower().encode())
    return {
        "city": city,
        "forecast": FORECASTS[seed % len(FORECASTS)],
        "celsius": 5 + seed % 25,
        "call": call.call_id if call else None,
    }


async def main() -> None:
    nc = await nats.connect(os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
    await voicemesh.tools.serve(nc, "tools.weather", get_weather)
    print("serving get_weather on tools.weather; Ctrl-C stops")
    try:
        await asyncio.Event().wait()
    finally:
        await nc.drain()


if __name__ == "__main__":
    asyncio.run(main())
