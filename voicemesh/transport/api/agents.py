"""`/api/agents`: the named templates a session starts from (no TTL, one default). Agents are the
operator's catalogue, sessions the per-call copies; keeping their routes apart keeps that line
clear: nothing here touches a live call.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from voicemesh.config.models import AgentConfig, ConfigIssue, ConfigValidationError
from voicemesh.state.store import NotFound, check_agent_name
from voicemesh.transport.api.service import TransportService


class AgentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    description: str = Field("", max_length=2000)
    config: AgentConfig
    default: bool = False


class AgentUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str | None = Field(None, max_length=2000)
    config: AgentConfig


def name_ok(name: str) -> str:
    try:
        return check_agent_name(name)
    except ValueError as exc:
        raise ConfigValidationError([ConfigIssue(loc=["name"], msg=str(exc))]) from None


def agents_router(service: TransportService) -> APIRouter:
    """The agent routes, without prefix or auth: create_app mounts them under its /api router."""
    router = APIRouter()
    store = lambda: service.store  # noqa: E731  (bound at request time, after lifespan start)

    @router.get("/agents")
    async def list_agents() -> dict[str, Any]:
        default = await store().get_default_agent()
        agents = await store().list_agents()
        return {
            "default": default.name if default else None,
            "agents": [a.to_json() for a in agents],
        }

    @router.post("/agents", status_code=201)
    async def create_agent(body: AgentIn) -> dict[str, Any]:
        record = await store().create_agent(
            name_ok(body.name), body.config, description=body.description
        )
        if body.default:
            await store().set_default_agent(record.name)
        return record.to_json()

    @router.get("/agents/current")
    async def current_agent() -> dict[str, Any]:
        record = await store().get_default_agent()
        if record is None:
            raise NotFound("no default agent is set")
        return record.to_json()

    @router.get("/agents/{name}")
    async def get_agent(name: str) -> dict[str, Any]:
        record = await store().get_agent(name)
        if record is None:
            raise NotFound(f"agent {name!r} not found")
        return record.to_json()

    @router.put("/agents/{name}")
    async def update_agent(name: str, body: AgentUpdate) -> dict[str, Any]:
        record = await store().update_agent(
            name_ok(name), body.config, description=body.description
        )
        return record.to_json()

    @router.delete("/agents/{name}")
    async def delete_agent(name: str) -> dict[str, Any]:
        if not await store().delete_agent(name):
            raise NotFound(f"agent {name!r} not found")
        return {"deleted": name}

    @router.post("/agents/{name}/set-default")
    async def set_default(name: str) -> dict[str, Any]:
        await store().set_default_agent(name)
        return {"default": name}

    return router
