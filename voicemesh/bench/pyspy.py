"""A breakdown of a py-spy profile (`py-spy record -f raw`: folded stacks, one line per stack with
its sample count) by what the transport's per-frame path spends its time on. Each stack counts
for the first category matched from its leaf upwards, so time in C called from Python (libopus,
soxr, webrtcvad) goes to the Python function that called it.

    categories = breakdown(Path("transport.raw").read_text())
"""

from __future__ import annotations

import re
from collections import Counter

#: a stack whose leaf is one of these is a thread waiting, not working: py-spy --nonblocking
#: cannot always tell (the loop's epoll wait shows as its Runner.run, an idle executor thread
#: as its _worker); they are counted apart, as IDLE
IDLE = "idle (waiting)"
_IDLE_LEAVES = re.compile(
    r"^(Runner\.run \(asyncio/runners|_worker \(concurrent/futures/thread\.py:8\d|"
    r"Condition\.wait \(threading|.*select \(selectors)"
)

#: (category, function name pattern, file path pattern), tried in order on each frame
RULES: tuple[tuple[str, str, str], ...] = (
    ("Opus decode (aiortc/PyAV)", r"(^|\.)decode$", r"aiortc/codecs/opus\.py"),
    ("Opus encode (aiortc/PyAV)", r"(^|\.)encode$", r"aiortc/codecs/opus\.py"),
    ("Opus encode (voicemesh, on the loop)", r"OpusPackets\.encode$", r"carriers/rtc\.py"),
    ("Opus decode (aiortc/PyAV)", r"InlineDecoding\.put$", r"carriers/rtc\.py"),
    ("resample in (48k stereo → 16k mono)", r"(^|\.)to_16k_mono$", r"carriers/rtc\.py"),
    ("PCM → AudioFrame (out)", r"(^|\.)audio_frame$", r"carriers/rtc\.py"),
    ("resample out (egress)", r".*", r"transport/call/egress\.py"),
    ("VAD (webrtcvad / Silero)", r"(^|\.)(voiced|push)$", r"transport/call/turns\.py"),
    ("playout and pacing", r".*", r"transport/call/playout\.py"),
    ("playout and pacing", r"(^|\.)_pace$", r"transport/call/call\.py"),
    ("playout and pacing", r"(^|\.)(recv|put|flush|send_audio)$", r"carriers/webrtc\.py"),
    ("events to the caller", r"(^|\.)(send_event|deliver|_send_json)$", r"transport/"),
    ("NATS publish / frame encode", r".*", r"voicemesh/bus/|/nats/"),
    ("call loop (call.py)", r".*", r"transport/call/call\.py"),
    ("WebRTC receive path (webrtc.py)", r"(^|\.)receive$", r"carriers/webrtc\.py"),
    ("RTP audio level (aiortc, a Python loop)", r"compute_audio_level_dbov", r"aiortc/rtp\.py"),
    (
        "thread hand-offs (encoder executor, decoder thread)",
        r".*",
        r"concurrent/futures/|/threading\.py|/queue\.py",
    ),
    ("thread hand-offs (encoder executor, decoder thread)", r"run_coroutine_threadsafe", r""),
    ("SRTP / RTP / DTLS (aiortc)", r".*", r"pylibsrtp|aiortc/(rtcdtlstransport|rtp|rtcp)"),
    ("RTP sender / receiver (aiortc)", r".*", r"aiortc/(rtcrtpsender|rtcrtpreceiver|jitterbuffer)"),
    ("ICE / UDP (aioice)", r".*", r"aioice/"),
    ("SCTP data channel (aiortc)", r".*", r"aiortc/rtcsctptransport"),
    ("other aiortc / PyAV", r".*", r"aiortc/|/av/"),
    ("asyncio loop", r".*", r"asyncio/"),
)
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<path>.*?)(?::\d+)?\)$")
_COMPILED = [(c, re.compile(f), re.compile(p)) for c, f, p in RULES]


def category(stack: list[str]) -> str:
    for frame in reversed(stack):
        m = _FRAME.match(frame.strip())
        if m is None:
            continue
        func, path = m["func"], m["path"]
        for name, f, p in _COMPILED:
            if p.search(path) and f.search(func):
                return name
    return "other"


def breakdown(folded: str) -> Counter[str]:
    """Samples per category of py-spy's raw (folded) output."""
    counts: Counter[str] = Counter()
    for line in folded.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        idle = _IDLE_LEAVES.match(frames[-1].strip())
        counts[IDLE if idle else category(frames)] += int(n)
    return counts
