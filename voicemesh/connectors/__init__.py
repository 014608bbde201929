"""Provider connectors per stage (services/<stage>/<provider> as in pipecat), a lazy registry and
primary/fallback chains."""

from voicemesh.connectors.base import LLMConnector, STTConnector, TTSConnector
from voicemesh.connectors.registry import ConnectorPool, connector_class

__all__ = ["ConnectorPool", "LLMConnector", "STTConnector", "TTSConnector", "connector_class"]
