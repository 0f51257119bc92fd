"""One logging switch for every process of a run: the CLI, rank processes, transfer workers.

``MP_EPLB_LOG`` (a level name: ``DEBUG``, ``INFO``, ``WARNING``, ...) is read by
:func:`configure` in each process; the CLI's ``-v``/``-vv`` set it, and children inherit it
through their environment (rank processes by spawn, the transfer subprocess by ``Popen``).
"""

from __future__ import annotations

import logging
import os

__all__ = ["LOG_ENV", "configure", "level_from_env", "verbosity_level"]

#: Environment variable holding the log level of every mp_eplb process.
LOG_ENV = "MP_EPLB_LOG"


def verbosity_level(verbose: int) -> int:
    """The level of ``-v`` counted ``verbose`` times: WARNING, INFO (1), DEBUG (2 or more)."""
    return logging.WARNING - 10 * min(max(verbose, 0), 2)


def level_from_env(default: int) -> int:
    """``MP_EPLB_LOG`` as a level, or ``default`` when it is unset; ``ValueError`` names a bad
    value."""
    name = os.environ.get(LOG_ENV, "").strip().upper()
    if not name:
        return default
    level = logging.getLevelName(name)
    if not isinstance(level, int):
        raise ValueError(f"{LOG_ENV}={os.environ[LOG_ENV]!r} is not a log level; use DEBUG, "
                         "INFO, WARNING or ERROR")
    return level


def configure(who: str, *, default: int = logging.WARNING, export: int | None = None) -> int:
    """Set up this process's logging at ``MP_EPLB_LOG`` (else ``default``), each line tagged
    ``who`` (e.g. ``rank1``, ``worker[pid]``). ``export``: a level to write into
    ``MP_EPLB_LOG`` first, so this process and every child it starts use it. Returns the level."""
    if export is not None:
        os.environ[LOG_ENV] = logging.getLevelName(export)
    level = level_from_env(default)
    logging.basicConfig(level=level, force=True,
                        format=f"%(asctime)s {who} %(name)s %(levelname)s %(message)s")
    return level
