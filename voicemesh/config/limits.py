"""Size caps on what a config may hold (issue 12: configs are untrusted input).

A config runs inside stage processes that serve every tenant, so nothing in it may be unbounded:
every string and list option has a finite cap, checked when the config is pushed (a 422 that
names the path) and shown in the JSON Schema that `voicemesh config schema` and the API print.
The caps are generous for real use and small enough that no single config can make a stage
hold, send or synthesize megabytes on its behalf. docs/security.md lists them.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field
from pydantic_core import PydanticCustomError

#: a system prompt (also: the longest single text option a provider receives as instructions)
PROMPT_MAX_CHARS = 32_000
#: free text sent to a provider with each request: TTS voice instructions, an STT prompt
TEXT_MAX_CHARS = 4_000
#: one scripted reply, and how many a `scripted` LLM may hold
REPLY_MAX_CHARS = 2_000
REPLIES_MAX = 100
#: the `echo` LLM's prefix
PREFIX_MAX_CHARS = 200
#: a name or id: connector, stage, pipeline, model, voice, organization, TURN username
NAME_MAX_CHARS = 128
#: a language code (BCP 47 tags are at most 35 characters)
LANGUAGE_MAX_CHARS = 35
#: a URL (base_url, a STUN/TURN URL, a Daily room), and how many ICE servers a call may list
URL_MAX_CHARS = 2_048
ICE_SERVERS_MAX = 16
#: a credential field: a "${ENV}" reference, and the value it resolves to in the stage
CREDENTIAL_MAX_CHARS = 8_192
#: keys in one connector's options object, and connectors' options kept per stage
OPTIONS_KEYS_MAX = 64
CONNECTOR_CONFIGS_MAX = 16
#: fallback connectors per stage, stages per config, edges per flow
FALLBACKS_MAX = 8
STAGES_MAX = 8
FLOW_EDGES_MAX = 32

Name = Annotated[str, Field(max_length=NAME_MAX_CHARS)]
Url = Annotated[str, Field(max_length=URL_MAX_CHARS)]
Reply = Annotated[str, Field(max_length=REPLY_MAX_CHARS)]


def entries_at_most(limit: int) -> BeforeValidator:
    """Refuse an object of more than `limit` entries before its entries are validated: pydantic
    checks a dict's max_length only after each value, so an object of a million bad values
    would answer with a million issues. (Keep Field(max_length=...) too, for the schema.)"""

    def check(value: Any) -> Any:
        if isinstance(value, dict | list) and len(value) > limit:
            raise PydanticCustomError(
                "too_long",
                "should have at most {limit} entries, not {actual}",
                {"limit": limit, "actual": len(value)},
            )
        return value

    return BeforeValidator(check)
