"""Agent config models, connector options, settings from the environment, secret references."""

from voicemesh.config.connectors import CONNECTOR_OPTIONS, STAGE_IO
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
from voicemesh.config.stages import PROCESSING, STAGES, Stage

__all__ = [
    "CONNECTOR_OPTIONS",
    "PROCESSING",
    "STAGES",
    "STAGE_IO",
    "AgentConfig",
    "ConfigIssue",
    "ConfigValidationError",
    "FlowEdge",
    "PipelineSpec",
    "Settings",
    "Stage",
    "StageConnectors",
    "format_errors",
    "get_settings",
    "parse_agent_config",
]
