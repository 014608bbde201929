"""`/api/agents`: the named templates a session starts from (no TTL, one default). Agents are the
catalogue, sessions the per-call copies; keeping their routes apart keeps that line clear: nothing
here touches a live call.

Agents are global (the operator's catalogue, e.g. the default agent 'local') or a tenant's own.
A tenant reads its own and the global ones; a name resolves to its own agent first, then to the
global one, so a tenant may shadow a global name without changing it for anyone else. Only admin
keys write global agents (a tenant gets 403 for a global agent it can see, 404 for anything it
cannot). A tenant's default is the agent it chose with set-default (its own or a global one),
else the global default. Admins write the global catalogue; with `?tenant=NAME` they act on that
tenant's agents instead, and their listing shows every tenant's agents.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from voicemesh.config.models import AgentConfig, ConfigIssue, ConfigValidationError
from voicemesh.config.settings import TENANT_NAME
from voicemesh.state import AgentRecord, ConfigStore
from voicemesh.state.store import NotFound, check_agent_name
from voicemesh.transport.api.errors import Forbidden
from voicemesh.transport.api.security import ApiKeyAuth, Client
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


def scope_of(client: Client, tenant: str | None) -> str | None:
    """The agent scope a request acts on: the client's own (None, the global catalogue, for an
    admin), or for an admin the tenant it names. A tenant naming another tenant gets the same 404
    as for a name that does not exist."""
    if tenant is None or tenant == client.tenant.scope:
        return client.tenant.scope
    if not client.admin or not TENANT_NAME.fullmatch(tenant):
        raise NotFound(f"tenant {tenant[:40]!r} not found")
    return tenant


async def resolve_agent(store: ConfigStore, name: str, scope: str | None) -> AgentRecord | None:
    """The agent `name` as scope `scope` sees it: its own first, then the global one."""
    if scope is not None:
        record = await store.get_agent(name, tenant=scope)
        if record is not None:
            return record
    return await store.get_agent(name)


async def default_agent(store: ConfigStore, scope: str | None) -> AgentRecord | None:
    """Scope `scope`'s default agent: its own choice while that agent exists, else the global
    default."""
    if scope is not None:
        name = await store.default_agent_name(tenant=scope)
        if name is not None:
            record = await resolve_agent(store, name, scope)
            if record is not None:
                return record
    return await store.get_default_agent()


async def agent_for(store: ConfigStore, name: str | None, client: Client) -> AgentRecord:
    """The agent a new session of `client` starts from (the default one when `name` is None);
    NotFound naming what is missing."""
    scope = client.tenant.scope
    record = await resolve_agent(store, name, scope) if name else await default_agent(store, scope)
    if record is None:
        raise NotFound(f"agent {name!r} not found" if name else "no default agent is set")
    return record


async def writable(store: ConfigStore, name: str, scope: str | None) -> None:
    """NotFound if scope `scope` has no agent `name` to change; Forbidden if the name is a global
    agent the (non-admin) scope can read but not change."""
    if await store.get_agent(name, tenant=scope) is not None:
        return
    if scope is not None and await store.get_agent(name) is not None:
        raise Forbidden(f"agent {name!r} is global: only an admin key may change it")
    raise NotFound(f"agent {name!r} not found")


def agents_router(service: TransportService, auth: ApiKeyAuth) -> APIRouter:
    """The agent routes, without prefix: create_app mounts them under its /api router, whose key
    dependency `auth` is (here it is cached: it runs once)."""
    router = APIRouter()
    store = lambda: service.store  # noqa: E731  (bound at request time, after lifespan start)

    @router.get("/agents")
    async def list_agents(
        tenant: str | None = None, client: Client = Depends(auth)
    ) -> dict[str, Any]:
        scope = scope_of(client, tenant)
        default = await default_agent(store(), scope)
        agents = [] if scope is None else await store().list_agents(tenant=scope)
        agents += await store().list_agents()
        if scope is None:  # an admin's own view: every tenant's agents too
            for name in await store().agent_tenants():
                agents += await store().list_agents(tenant=name)
        return {
            "default": default.name if default else None,
            "agents": [a.to_json() for a in agents],
        }

    @router.post("/agents", status_code=201)
    async def create_agent(
        body: AgentIn, tenant: str | None = None, client: Client = Depends(auth)
    ) -> dict[str, Any]:
        scope = scope_of(client, tenant)
        record = await store().create_agent(
            name_ok(body.name), body.config, description=body.description, tenant=scope
        )
        if body.default:
            await store().set_default_agent(record.name, tenant=scope)
        return record.to_json()

    @router.get("/agents/current")
    async def current_agent(
        tenant: str | None = None, client: Client = Depends(auth)
    ) -> dict[str, Any]:
        record = await default_agent(store(), scope_of(client, tenant))
        if record is None:
            raise NotFound("no default agent is set")
        return record.to_json()

    @router.get("/agents/{name}")
    async def get_agent(
        name: str, tenant: str | None = None, client: Client = Depends(auth)
    ) -> dict[str, Any]:
        record = await resolve_agent(store(), name, scope_of(client, tenant))
        if record is None:
            raise NotFound(f"agent {name!r} not found")
        return record.to_json()

    @router.put("/agents/{name}")
    async def update_agent(
        name: str, body: AgentUpdate, tenant: str | None = None, client: Client = Depends(auth)
    ) -> dict[str, Any]:
        scope = scope_of(client, tenant)
        await writable(store(), name_ok(name), scope)
        record = await store().update_agent(
            name, body.config, description=body.description, tenant=scope
        )
        return record.to_json()

    @router.delete("/agents/{name}")
    async def delete_agent(
        name: str, tenant: str | None = None, client: Client = Depends(auth)
    ) -> dict[str, Any]:
        scope = scope_of(client, tenant)
        await writable(store(), name, scope)
        if not await store().delete_agent(name, tenant=scope):
            raise NotFound(f"agent {name!r} not found")
        return {"deleted": name}

    @router.post("/agents/{name}/set-default")
    async def set_default(
        name: str, tenant: str | None = None, client: Client = Depends(auth)
    ) -> dict[str, Any]:
        """A tenant's default may be its own agent or a global one; the global default (an
        admin's, without `tenant`) is a global agent."""
        scope = scope_of(client, tenant)
        record = await resolve_agent(store(), name, scope)
        if record is None:
            raise NotFound(f"agent {name!r} not found")
        await store().set_default_agent(name, tenant=scope, global_agent=record.owner is None)
        return {"default": name}

    return router
