"""The errors a user can fix, as one family.

`enat` catches UserError once (cluster/cli.py) and prints its message as one line, exit
code 2; anything else is a bug and keeps its traceback. Each package raises its own
subclasses (ConfigError, StorageError, ManifestMismatch, ...), so code that handles one
kind can still catch it by name. Only the standard library is used: every layer may
import this.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; its message is one line naming what is wrong and what to do."""


class MissingInput(UserError, FileNotFoundError):
    """A file, folder or object the user pointed at is not there (still a FileNotFoundError,
    so code that tolerates missing files keeps doing so)."""
