"""Secret references: configs carry "${ENV_NAME}"; each stage resolves them from its environment.

Resolved values only ever live in a connector's memory; the stored and broadcast config keeps the
reference, so Valkey, NATS and logs never see the secret itself.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from voicemesh.errors import VoicemeshError

SECRET_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")
# Keys whose values are credentials: they must be written as ${ENV} references, never in clear.
# ("token" takes no plural: max_tokens is a length, not a credential.)
SECRET_KEY = re.compile(
    r"(api[_-]?keys?|apikeys?|secrets?|passwords?|passwd|token|credentials?|private[_-]?key"
    r"|secret[_-]?(access[_-]?)?key|subscription[_-]?key|access[_-]?key)$",
    re.IGNORECASE,
)


class SecretResolutionError(VoicemeshError, LookupError):
    """A config names an environment variable that this process does not have."""


def is_secret_key(key: str) -> bool:
    return bool(SECRET_KEY.search(key))


def is_secret_ref(value: Any) -> bool:
    return isinstance(value, str) and SECRET_REF.match(value) is not None


def find_clear_secrets(obj: Any, path: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """Paths of credential-named keys whose value is not a ${ENV} reference."""
    found: list[tuple[str | int, ...]] = []
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            sub = (*path, key)
            if isinstance(key, str) and is_secret_key(key) and value not in (None, ""):
                if not is_secret_ref(value):
                    found.append(sub)
                continue
            found.extend(find_clear_secrets(value, sub))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            found.extend(find_clear_secrets(value, (*path, i)))
    return found


def resolve_secrets(obj: Any, env: Mapping[str, str] | None = None) -> Any:
    """Return a copy with every ${ENV} reference replaced by the variable's value."""
    env = os.environ if env is None else env
    if isinstance(obj, Mapping):
        return {k: resolve_secrets(v, env) for k, v in obj.items()}
    if isinstance(obj, list):
        return [resolve_secrets(v, env) for v in obj]
    if isinstance(obj, str):
        match = SECRET_REF.match(obj)
        if match:
            name = match.group(1)
            if name not in env:
                raise SecretResolutionError(
                    f"environment variable {name} is referenced by the config but not set"
                )
            return env[name]
    return obj
