"""The carriers: how a call reaches us (a WebSocket, a WebRTC peer connection, a Twilio media
stream, a Daily room). Each module owns its signalling routes and a Peer that converts its media to
the bus audio format, and hands the call to the call engine; nothing about turns, the bus or
pacing lives here, so a new carrier is one module and gets the same call behaviour as the others.
"""
