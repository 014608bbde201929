"""The root of every error voicemesh raises on purpose.

One base lets an embedder (or a top-level handler) tell "voicemesh refused or could not do this"
from a bug or a library's own failure with a single `except VoicemeshError`. Each error keeps its
builtin base too (LookupError, ValueError, ConnectionError, ...), so existing `except` clauses
catch exactly what they caught before. Imports nothing, so every layer, config included, can use
it.
"""


class VoicemeshError(Exception):
    """Base of voicemesh's own errors."""
