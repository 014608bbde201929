"""The transport role: where calls come in and where configs are managed. Its rooms keep the call
itself apart from how it is carried and from who may manage it, so each can change alone:

- call/: the call engine, the same for every carrier: turns, the bus, playout, barge-in;
- carriers/: WebSocket, WebRTC, Twilio and Daily, each its routes and its Peer;
- api/: the config manager's HTTP API, auth, the TransportService and the app assembly.

Imports flow one way: callers (voicemesh.callers, the client side) → carriers → call, with api
beside the carriers; call imports neither of the others.
"""
