"""Loopback provider servers: each speaks one provider's real wire protocol on 127.0.0.1 and can
be told to fail in every way the fallback chain must survive."""

from voicemesh.testing.loopback.base import Failure, FailureMode, LoopbackServer

__all__ = ["Failure", "FailureMode", "LoopbackServer"]
