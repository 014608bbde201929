"""voicemesh: a real-time voice pipeline whose stages are separate services on NATS and Valkey."""

__version__ = "0.1.0"
