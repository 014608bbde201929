"""The transport service: calls (WebSocket now; WebRTC and Daily next), turn detection, the
config-manager HTTP API and the web client."""
