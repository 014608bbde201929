"""Who may publish and subscribe to what on NATS: one user per role, each allowed exactly the
subjects its job needs, derived from Subjects so the server's configuration and the code cannot
drift apart. `voicemesh up` writes this as its embedded server's config; `voicemesh nats-config`
prints it for an operator's own server (and docker-compose's deploy/nats.conf is its output).

What it rules out: a stage cannot publish `vm.ctl.*` (an `interrupt` with epoch 2^32 would silence
a session), cannot announce another stage's connector health, answer another role's health ping
or take its work, and reads no other role's request replies. Every role replies only to requests
it received (`allow_responses`), so none can forge a reply either.

What it cannot rule out, by design: every stage may publish frames to every data subject
(`vm.<stage>.<sid>`), since a session's flow (its config) decides the next hop, and the stages
notify the transport of every session. A role is trusted with the sessions it serves.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from voicemesh.bus.subjects import Subjects
from voicemesh.config.connections import DEFAULT_INBOX
from voicemesh.config.stages import PROCESSING, STAGES, Stage
from voicemesh.config.tools import current_tool_subjects

#: the operator's user: full rights, for tools (`voicemesh up`'s launcher, the bench harness,
#: tests' helpers) and never handed to a role
ADMIN = "admin"
#: every NATS (and Valkey) user `voicemesh up` creates, in a stable order
USERS: tuple[str, ...] = (*(str(s) for s in STAGES), ADMIN)


@dataclass(frozen=True, slots=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    #: may publish one reply to each request it received (nats-server's allow_responses)
    responses: bool = True


def inbox(user: str) -> str:
    """The user's reply inboxes (as nats-py requests them with inbox_prefix `_INBOX.<user>`)."""
    return f"{DEFAULT_INBOX}.{user}.>"


def permissions(user: str, subjects: Subjects) -> Permissions:
    """The subjects `user` (a role's name, or ADMIN) may publish and subscribe to."""
    if user == ADMIN:
        return Permissions(publish=(">",), subscribe=(">",))
    role = Stage(user)
    # a session's flow picks the next hop, and every stage tells the transport what it did
    data = tuple(subjects.data_all(s) for s in STAGES)
    if role is Stage.TRANSPORT:
        return Permissions(
            publish=(
                *data,
                subjects.ctl_all,  # turns, interrupts, hang-ups
                subjects.config_update,
                subjects.assign("*"),  # handing a session's stream to a streaming stage
                subjects.health("*"),  # is any instance of a stage running at all?
                subjects.watch_all,  # a copy of each call's caller events, for the console
            ),
            subscribe=(
                subjects.data_all(role),
                subjects.ctl_all,
                subjects.config_get_all,  # stages ask for a config while Valkey is down
                subjects.config_update,
                subjects.health(role),
                subjects.watch_all,  # the console's live views, from any transport's calls
                inbox(user),
            ),
        )
    assert role in PROCESSING
    # the LLM stage sends tool requests under the operator's tool prefixes (VOICEMESH_TOOL_SUBJECTS)
    tools = tuple(f"{p}.>" for p in current_tool_subjects()) if role is Stage.LLM else ()
    return Permissions(
        publish=(*data, subjects.config_get_all, subjects.connector_health(role), *tools),
        subscribe=(
            subjects.data_all(role),
            subjects.ctl_all,
            subjects.config_update,
            subjects.connector_health(role),
            subjects.health(role),
            subjects.assign(role),
            inbox(user),
        ),
    )


def _quoted(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def password_env(user: str) -> str:
    """The environment variable deploy/nats.conf takes `user`'s password from."""
    return f"NATS_PASSWORD_{user.upper()}"


def nats_config(
    subjects: Subjects,
    passwords: Mapping[str, str] | None = None,
    *,
    users: tuple[str, ...] = USERS,
    password_ref: Callable[[str], str] | None = None,
) -> str:
    """nats-server's `authorization` block for `users`, each with its permissions. Passwords are
    either given (`passwords`, written quoted: the file then holds secrets) or referenced as
    nats-server environment variables (`password_ref`, default NATS_PASSWORD_<USER>: the file is
    safe to commit). No user means no access: nothing connects without credentials."""
    if passwords is None:
        ref = password_ref or password_env
        secret: Callable[[str], str] = lambda u: "$" + ref(u)  # noqa: E731
    else:
        secret = lambda u: json.dumps(passwords[u])  # noqa: E731
    lines = [
        "# nats-server authorization: one user per voicemesh role, each allowed the subjects its",
        "# job needs. Generated by `voicemesh nats-config` (voicemesh/bus/permissions.py);",
        "# regenerate rather than edit.",
        "authorization {",
        "  users = [",
    ]
    for user in users:
        p = permissions(user, subjects)
        lines += [
            "    {",
            f"      user: {json.dumps(user)}",
            f"      password: {secret(user)}",
            "      permissions: {",
            f"        publish: {{ allow: {_quoted(p.publish)} }}",
            f"        subscribe: {{ allow: {_quoted(p.subscribe)} }}",
            f"        allow_responses: {'true' if p.responses else 'false'}",
            "      }",
            "    }",
        ]
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def permissions_table(subjects: Subjects, users: tuple[str, ...] = USERS) -> str:
    """The same permissions as a Markdown table (docs/operations.md quotes it)."""
    rows = [
        "| user | may publish | may subscribe |",
        "|---|---|---|",
    ]
    for user in users:
        p = permissions(user, subjects)
        pub = ", ".join(f"`{s}`" for s in p.publish)
        if p.responses and user != ADMIN:
            pub += ", replies to requests it received"
        sub = ", ".join(f"`{s}`" for s in p.subscribe)
        rows.append(f"| `{user}` | {pub} | {sub} |")
    return "\n".join(rows) + "\n"
