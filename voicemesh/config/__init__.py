"""Agent config models, connector options, settings from the environment, secret references."""

from voicemesh.config.connectors import CONNECTOR_OPTIONS, STAGE_IO, STAGES
from voicemesh.config.models import (
    AgentConfig,
    ConfigIssue,
    ConfigValidationError,
    FlowEdge,
    PipelineSpec,
    StageConnectors,
    format_errors,
    parse_agent_config,
)
from voicemesh.config.settings import Settings, get_settings

__all__ = [
    "CONNECTOR_OPTIONS",
    "STAGES",
    "STAGE_IO",
    "AgentConfig",
    "ConfigIssue",
    "ConfigValidationError",
    "FlowEdge",
    "PipelineSpec",
    "Settings",
    "StageConnectors",
    "format_errors",
    "get_settings",
    "parse_agent_config",
]
