"""The transport role: where calls come in and where configs are managed. Four rooms, imports
flowing one way (callers → carriers → call engine; api beside the carriers):

- call/: the call engine, the same for every carrier: turns, the bus, playout, barge-in;
- carriers/: WebSocket, WebRTC, Twilio and Daily, each its routes and its Peer;
- api/: the config manager's HTTP API, auth, the TransportService and the app assembly.

The CLI's callers (voicemesh.callers) sit above all of them.
"""
