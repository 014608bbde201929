"""What the connectors that drive httpx themselves share (kept out of `errors`, which imports no
HTTP client or SDK)."""

from __future__ import annotations

import httpx

#: Timeout of the httpx clients the connectors build (30 s per operation, 5 s to connect).
TIMEOUT = httpx.Timeout(30.0, connect=5.0)
