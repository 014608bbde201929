"""The built-in tool set_config: the LLM switches its own session's config, within what the
tool's config allows (voicemesh/config/tools.py, SetConfigHandler).

The change goes the way a `PATCH /sessions/{id}/config` goes: the stored config is read, changed,
validated whole (egress, credentials, flow: a switched-to connector must pass every rule a pushed
config passes), written back only if nobody wrote meanwhile, and announced on vm.config.update, so
every stage and the transport load the new version. The turn that made the change finishes with
the config it started with; the change applies from the next thing each stage does.

end_call needs nothing here: the runner answers it, and the LLM stage hangs up after the reply.
"""

from __future__ import annotations

from typing import Any

import orjson

from voicemesh.bus import Bus, Subjects
from voicemesh.config.models import ConfigValidationError, parse_agent_config
from voicemesh.config.tools import SetConfigHandler
from voicemesh.router.service_router import publish_config_update
from voicemesh.state.store import ConfigStore, Conflict
from voicemesh.tools.runner import ToolFailed

ATTEMPTS = 5


def planned(handler: SetConfigHandler, args: dict[str, Any]) -> dict[str, str]:
    """What the call asks to change, checked against the tool's lists (the schema made from
    them was checked already: this holds even for a schema a connector ignored)."""
    change: dict[str, str] = {}
    stage, connector, prompt = args.get("stage"), args.get("connector"), args.get("prompt")
    if (stage is None) != (connector is None):
        raise ToolFailed("bad arguments", "give stage and connector together")
    if stage is not None:
        allowed = handler.connectors.get(stage)
        if allowed is None or connector not in allowed:
            raise ToolFailed(
                "refused", f"switching {stage} to {str(connector)[:64]!r} is not allowed"
            )
        change[f"connectors.{stage}.primary"] = str(connector)
    if prompt is not None:
        if prompt not in handler.prompts:
            raise ToolFailed("refused", f"there is no prompt named {str(prompt)[:64]!r}")
        change["system_prompt"] = str(prompt)
    if not change:
        raise ToolFailed("bad arguments", "nothing to change: give stage and connector, or prompt")
    return change


def apply(data: dict[str, Any], handler: SetConfigHandler, change: dict[str, str]) -> None:
    for path, value in change.items():
        if path == "system_prompt":
            data["system_prompt"] = handler.prompts[value]
            continue
        stage = path.split(".")[1]
        connectors = data.get("connectors", {}).get(stage)
        if not isinstance(connectors, dict):
            raise ToolFailed("refused", f"this agent has no {stage} stage")
        connectors["primary"] = value
        # the new primary is not also its own fallback
        connectors["fallback"] = [f for f in connectors.get("fallback", []) if f != value]


async def set_config(
    store: ConfigStore,
    bus: Bus,
    subjects: Subjects,
    session: str,
    handler: SetConfigHandler,
    args: dict[str, Any],
) -> dict[str, Any]:
    change = planned(handler, args)
    for attempt in range(ATTEMPTS):  # compare-and-set, as the API's PATCH
        stored = await store.get_config(session)
        if stored is None:
            raise ToolFailed("refused", "the session is gone")
        data = orjson.loads(stored.config.to_json())
        apply(data, handler, change)
        try:
            config = parse_agent_config(data)
        except ConfigValidationError as exc:
            first = exc.issues[0] if exc.issues else None
            detail = f"{first.path}: {first.msg}" if first is not None else str(exc)
            raise ToolFailed(
                "refused", f"the changed config is not valid: {detail[:300]}"
            ) from None
        try:
            version = await store.update_config(session, config, expect_version=stored.version)
            break
        except Conflict:
            if attempt == ATTEMPTS - 1:
                raise ToolFailed("handler error", "the config kept changing meanwhile") from None
    keys = sorted({p.split(".")[0] for p in change})
    # hop: -> voicemesh.router.service_router.ServiceRouter._on_update (vm.config.update)
    await publish_config_update(bus, subjects, session, version, keys)
    return {"changed": change, "version": version, "applies": "from the next turn"}
