"""Credentials for the embedded servers of one `voicemesh up` run (and the test fixtures): a random
password per role and server, the server configs that grant each role its permissions
(voicemesh.bus.permissions, voicemesh.state.acl), and each role's environment.

Passwords live in memory, in the roles' environments (never on a command line, where `ps` shows
them) and in files only the owner can read: nats.conf holds them (nats-server compares plain
passwords), the Valkey ACL file only their SHA-256. Every run makes new ones.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr

from voicemesh.bus.permissions import ADMIN, USERS, nats_config
from voicemesh.bus.subjects import Subjects
from voicemesh.config.settings import ConnectionSettings
from voicemesh.state.acl import acl_file
from voicemesh.state.keys import Keys

#: role environment variables that would fight the generated credentials (a token beside a user
#: is refused by the settings; an inbox prefix set for another user breaks request/reply)
NATS_ENV = (
    "VOICEMESH_NATS_USER",
    "VOICEMESH_NATS_PASSWORD",
    "VOICEMESH_NATS_TOKEN",
    "VOICEMESH_NATS_CREDS",
    "VOICEMESH_NATS_INBOX_PREFIX",
)
VALKEY_ENV = ("VOICEMESH_VALKEY_USERNAME", "VOICEMESH_VALKEY_PASSWORD")


def _passwords() -> dict[str, str]:
    return {user: secrets.token_urlsafe(24) for user in USERS}


def write_private(path: Path, text: str) -> Path:
    """Write `text` to `path` readable by its owner only (0600), also when the file existed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    return path


@dataclass(frozen=True)
class ServerCredentials:
    """Per-user passwords for NATS and Valkey; an empty mapping means that server is not ours
    (external, with the operator's own credentials)."""

    nats: dict[str, str] = field(default_factory=dict, repr=False)
    valkey: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def generate(cls, *, nats: bool = True, valkey: bool = True) -> ServerCredentials:
        return cls(_passwords() if nats else {}, _passwords() if valkey else {})

    def role_env(self, role: str) -> dict[str, str]:
        """What a role process's environment gets: its own user and password, nothing else."""
        env: dict[str, str] = {}
        if self.nats:
            env.update(VOICEMESH_NATS_USER=role, VOICEMESH_NATS_PASSWORD=self.nats[role])
        if self.valkey:
            env.update(VOICEMESH_VALKEY_USERNAME=role, VOICEMESH_VALKEY_PASSWORD=self.valkey[role])
        return env

    def scrub(self, env: dict[str, str]) -> dict[str, str]:
        """`env` without the credential variables of the servers these credentials are for."""
        drop = (NATS_ENV if self.nats else ()) + (VALKEY_ENV if self.valkey else ())
        return {k: v for k, v in env.items() if k not in drop}

    def settings(
        self, user: str = ADMIN, base: ConnectionSettings | None = None
    ) -> ConnectionSettings:
        """Connection settings for `user` (the launcher's own connections use ADMIN); TLS and the
        credentials of a server that is not ours come from `base`."""
        update: dict[str, object] = {}
        if self.nats:
            update.update(
                nats_user=user,
                nats_password=SecretStr(self.nats[user]),
                nats_token=None,
                nats_creds=None,
                nats_inbox_prefix=None,
            )
        if self.valkey:
            update.update(valkey_username=user, valkey_password=SecretStr(self.valkey[user]))
        return (base if base is not None else ConnectionSettings()).model_copy(update=update)

    def url(self, url: str, user: str = ADMIN) -> str:
        """`url` with `user`'s credentials in it (for tools that take only a URL)."""
        passwords = self.nats if url.startswith("nats") else self.valkey
        # a list of seeds: each full URL gets them (nats-py logs in to each with its own)
        return ",".join(
            part.replace("://", f"://{user}:{passwords[user]}@", 1) for part in url.split(",")
        )

    def write_nats_config(self, path: Path, subjects: Subjects) -> Path:
        return write_private(path, nats_config(subjects, self.nats))

    def write_valkey_acl(self, path: Path, keys: Keys) -> Path:
        return write_private(path, acl_file(keys, self.valkey))
