"""The twilio transport (in progress: no routes yet)."""

from __future__ import annotations

from fastapi import APIRouter

from voicemesh.transport.peer import CallSession
from voicemesh.transport.security import ApiKeyAuth
from voicemesh.transport.service import TransportService


def twilio_routes(
    service: TransportService, call_session: CallSession, auth: ApiKeyAuth
) -> APIRouter:
    return APIRouter()
