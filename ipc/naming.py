"""The prefix of everything ipc names, so that one user's names are told from another's.

Shared segments are named ``<prefix>_<pid>_<n>_<8 hex>`` (:mod:`ipc.handles`; a handle whose
name has another prefix is refused) and private socket directories
``<prefix>-ipc-<pid>-<random>`` (:mod:`ipc.channel`; only those of this prefix are swept). The
prefix is :data:`DEFAULT_PREFIX` until the package using ipc calls :func:`set_name_prefix`
once, before it names anything, in every process that exchanges handles (a spawned helper
included). Standard library only: setting the prefix imports nothing heavy.
"""

from __future__ import annotations

import re

__all__ = ["DEFAULT_PREFIX", "name_prefix", "private_dir_prefix", "segment_prefix",
           "set_name_prefix"]

DEFAULT_PREFIX = "ipc"
_PREFIX_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,15}\Z")
_prefix = DEFAULT_PREFIX


def set_name_prefix(prefix: str) -> None:
    """Name what ipc creates from now on ``prefix``-first, and accept only handles so named.
    ``ValueError`` unless ``prefix`` is 1-16 letters, digits or underscores, letter first."""
    global _prefix
    if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix):
        raise ValueError(f"ipc name prefix {prefix!r} must be 1-16 letters, digits or "
                         "underscores, starting with a letter (e.g. 'my_app')")
    _prefix = prefix


def name_prefix() -> str:
    """The prefix set by :func:`set_name_prefix` (else :data:`DEFAULT_PREFIX`)."""
    return _prefix


def segment_prefix() -> str:
    """How a shared segment's name starts: ``<prefix>_``."""
    return f"{_prefix}_"


def private_dir_prefix() -> str:
    """How a private socket directory's name starts: ``<prefix>-ipc-``."""
    return f"{_prefix}-ipc-"
