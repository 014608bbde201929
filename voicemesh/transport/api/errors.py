"""The error bodies this API sends, and the handlers that turn the store's and the config's
exceptions into them. One place for both, so every router raises plain exceptions (NotFound,
Conflict, ConfigValidationError) and still answers in the one documented shape: a 422 lists every
problem by its JSON path, whichever layer found it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from voicemesh.config.models import ConfigIssue, ConfigValidationError
from voicemesh.errors import VoicemeshError
from voicemesh.state.store import Conflict, NotFound
from voicemesh.transport.api.capacity import AtCapacity, on_at_capacity
from voicemesh.transport.api.security import (
    RateLimited,
    Unauthorized,
    on_rate_limited,
    on_unauthorized,
)


class Forbidden(VoicemeshError):
    """A resource the client can see but not change (a global agent, for a tenant): 403."""


class IssueOut(BaseModel):
    loc: list[str | int] = Field(description="JSON path of the problem, as a list")
    path: str = Field(description='the same path, dotted: "connectors.llm.fallback[1]"')
    msg: str


class IssuesOut(BaseModel):
    """What a 422 carries: every problem of the request, each named by its path."""

    detail: list[IssueOut]


class ErrorOut(BaseModel):
    detail: str


# The error bodies this API really sends (FastAPI would document its own 422 shape otherwise).
ERRORS: dict[int | str, dict[str, Any]] = {
    403: {"model": ErrorOut, "description": "a global agent: only admin keys change it"},
    404: {
        "model": ErrorOut,
        "description": "not found (or the session expired, or it is another tenant's)",
    },
    409: {"model": ErrorOut, "description": "conflict (the name is taken, or a concurrent write)"},
    422: {"model": IssuesOut, "description": "invalid request: each issue names its JSON path"},
    429: {
        "model": ErrorOut,
        "description": "over the tenant's session rate or concurrent calls (see Retry-After)",
    },
    503: {
        "model": ErrorOut,
        "description": "this transport carries VOICEMESH_MAX_CALLS calls (see Retry-After)",
    },
}


def _issues(issues: list[ConfigIssue]) -> JSONResponse:
    return JSONResponse(
        status_code=422,
        content={"detail": [{"loc": i.loc, "path": i.path, "msg": i.msg} for i in issues]},
    )


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": message})


def add_error_handlers(app: FastAPI) -> None:
    # Registered through the decorator: Starlette's ExceptionHandler type has no place for one
    # handler that answers both HTTP requests and WebSockets, as these do.
    app.exception_handler(Unauthorized)(on_unauthorized)
    app.exception_handler(RateLimited)(on_rate_limited)
    app.exception_handler(AtCapacity)(on_at_capacity)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        issues = []
        for err in exc.errors():
            loc = (
                list(err.get("loc", ()))[1:]
                if err.get("loc", ("",))[0] == "body"
                else list(err.get("loc", ()))
            )
            ctx = err.get("ctx") or {}
            if err.get("type") == "agent_config" and "issues" in ctx:
                issues += [ConfigIssue(loc=[*loc, *i["loc"]], msg=i["msg"]) for i in ctx["issues"]]
            else:
                issues.append(ConfigIssue(loc=loc, msg=err.get("msg", "invalid")))
        return _issues(issues)

    @app.exception_handler(ConfigValidationError)
    async def _invalid_config(_: Request, exc: ConfigValidationError) -> JSONResponse:
        return _issues(exc.issues)

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, exc: NotFound) -> JSONResponse:
        return _error(404, str(exc))

    @app.exception_handler(Forbidden)
    async def _forbidden(_: Request, exc: Forbidden) -> JSONResponse:
        return _error(403, str(exc))

    @app.exception_handler(Conflict)
    async def _conflict(_: Request, exc: Conflict) -> JSONResponse:
        return _error(409, str(exc))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # A bug or a library's failure: its words and traceback may name hosts, paths or secret
        # values, so the client gets none of them. Starlette re-raises after this answer, and
        # uvicorn logs the traceback through the root handler, which scrubs secrets.
        return _error(500, "internal server error")
