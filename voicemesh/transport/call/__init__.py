"""The call engine: what happens to a call whatever carries it. Turn detection, the bus towards
STT, bot audio put in order and paced, barge-in, redelivery of lost work, per-turn latency.

It knows no codec, no socket and no HTTP route: a carrier hands it a Peer that converts its media
to the bus audio format (audio.py), and the service that hosts it is a CallHost (host.py). That
keeps one behaviour for every carrier, testable without any of them.
"""
