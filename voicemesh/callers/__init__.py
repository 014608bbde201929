"""Headless callers: the client side of a call, for `voicemesh call`, the benchmark harness and the
tests. They play WAV files as a microphone would, record the bot and time each turn from the
caller's side, which is the only place a caller's latency can be measured.

They speak the wire protocols any client would (a WebSocket, SmallWebRTC signalling) and import
nothing of the server but the bus audio format and the aiortc media helpers it shares with the
WebRTC carrier (voicemesh.transport.carriers.rtc).
"""
