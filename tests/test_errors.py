"""Every error voicemesh raises on purpose shares one root and keeps its builtin base."""

from __future__ import annotations

import pytest

from voicemesh.bus import BusError, FrameError
from voicemesh.config.models import ConfigValidationError
from voicemesh.config.secrets import SecretResolutionError
from voicemesh.connectors.errors import ConnectorError
from voicemesh.connectors.fallback import AllConnectorsFailed
from voicemesh.connectors.proof import EngineError
from voicemesh.errors import VoicemeshError
from voicemesh.launcher import CrashLoop, StartupError
from voicemesh.router import NoRoute
from voicemesh.servers import ServerError
from voicemesh.state import Conflict, NotFound, StoreError
from voicemesh.transport.api.security import AuthConfigError, RateLimited, Unauthorized
from voicemesh.transport.call.host import NoInstance
from voicemesh.transport.carriers.daily import JoinFailed

# (error, the builtin base that existing except clauses rely on)
ERRORS: list[tuple[type[Exception], type[Exception]]] = [
    (BusError, ConnectionError),
    (StoreError, ConnectionError),
    (FrameError, ValueError),
    (Conflict, ValueError),
    (ConfigValidationError, ValueError),
    (AuthConfigError, ValueError),
    (NotFound, LookupError),
    (NoRoute, LookupError),
    (SecretResolutionError, LookupError),
    (StartupError, RuntimeError),
    (CrashLoop, RuntimeError),
    (EngineError, RuntimeError),
    (ServerError, RuntimeError),
    (NoInstance, RuntimeError),
    (AllConnectorsFailed, RuntimeError),
    (ConnectorError, Exception),
    (JoinFailed, Exception),
    (Unauthorized, Exception),
    (RateLimited, Exception),
]


@pytest.mark.parametrize(("error", "base"), ERRORS, ids=[e.__name__ for e, _ in ERRORS])
def test_one_root_and_the_old_base(error: type[Exception], base: type[Exception]) -> None:
    assert issubclass(error, VoicemeshError)
    assert issubclass(error, base)
