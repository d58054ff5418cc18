"""One command at a time in an output directory: a lock held while a command writes there.

Light on purpose (no torch): `texforce` releases the locks after every command.
"""
from __future__ import annotations

import os
from pathlib import Path

from rl.config import ConfigError

_CLAIMED: dict[Path, int] = {}
"""The output directories this process writes (`claim_output_dir`): each one's descriptor, holding its lock."""


def claim_output_dir(path: str | Path, option: str) -> None:
    """Hold an exclusive lock on the directory `path` (flock on its own descriptor: no file added to it) until
    `release_output_dirs`: a second command pointed at it while this one writes there is refused at once (two runs
    with one run_name, two evals with one --out mixed their files, each saying it wrote them). A filesystem without
    locks is left unlocked."""
    import fcntl

    key = Path(path).resolve()
    if key in _CLAIMED:
        return
    fd = os.open(key, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"{option}: {path} is in use by another texforce command, which writes its outputs there; "
                          "wait for it to end, or choose another directory") from None
    except OSError:  # no locks on this filesystem
        os.close(fd)
        return
    _CLAIMED[key] = fd


def release_output_dirs() -> None:
    """Release every directory this process claimed (closing a descriptor drops its lock; so does exiting)."""
    while _CLAIMED:
        os.close(_CLAIMED.popitem()[1])
