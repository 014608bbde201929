"""The control plane: the config manager's HTTP API (agents, sessions), who may use it (API keys,
the session rate limit), the TransportService that hosts calls and answers `vm.config.get`, and
app.py, which assembles the app from these routers and the carriers' own.

The transport is the only role that writes configs; a stage only reads them. Carriers use this
room's auth, session resolver and service; only app.py imports the carriers, so nothing here
imports app.py and this package's __init__ imports nothing.
"""
