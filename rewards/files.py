"""Where a reward's model files come from: the `paths` dict, then an environment variable.

Clusters often have no hub access, so nothing here downloads. Each file a reward needs is
a `FileSpec`; resolving it either returns an existing path or raises an error that names
the key, the path tried and what to download.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rewards.base import RewardFileError


@dataclass(frozen=True)
class FileSpec:
    """One file or directory a reward loads.

    key: the key in `paths` (and `TEXFORCE_<KEY>` in the environment).
    kind: "file" or "dir".
    what: what the user should provide, e.g. where to download it.
    filename: for kind "file", the name looked up when the user passes a directory.
    default_from: another key; when this key is not given, look in that key's directory
        (for kind "dir": use that directory itself).
    optional: the reward works without it (e.g. face_quality when mediapipe imports), so
        only a path that is given is checked before a run.
    """

    key: str
    kind: Literal["file", "dir"]
    what: str
    filename: str | None = None
    default_from: str | None = None
    optional: bool = False

    @property
    def env_var(self) -> str:
        return "TEXFORCE_" + "".join(c if c.isalnum() else "_" for c in self.key).upper()

    def describe(self) -> str:
        """One line for `texforce rewards list`."""
        where = "the {!r} directory" if self.kind == "dir" else "next to {!r}"
        extra = f" (default: {where.format(self.default_from)})" if self.default_from else ""
        extra += " (optional)" if self.optional else ""
        return f"{self.key}: {self.what}{extra}"

    def is_given(self, paths: Mapping[str, str] | None) -> bool:
        """Whether `paths` or the environment names this file."""
        return bool((paths or {}).get(self.key) or os.environ.get(self.env_var))

    def resolve(self, paths: Mapping[str, str] | None) -> Path:
        """Return the existing path for this key, or raise RewardFileError saying what to pass."""
        paths = dict(paths or {})
        value = paths.get(self.key) or os.environ.get(self.env_var)
        how = (
            f"set reward.paths.{self.key}=PATH in the training config (--paths {self.key}=PATH for "
            f"score, eval and tune) or {self.env_var}=PATH in the environment"
        )
        if not value and self.default_from:
            base = paths.get(self.default_from) or os.environ.get(
                FileSpec(self.default_from, "file", "").env_var
            )
            if base:
                base_dir = Path(base).expanduser()
                base_dir = base_dir if base_dir.is_dir() else base_dir.parent
                value = str(base_dir if self.kind == "dir" else base_dir / (self.filename or ""))
        if not value:
            raise RewardFileError(f"no path given for {self.key!r}: provide {self.what}; {how}")
        path = Path(value).expanduser()
        if self.kind == "file" and self.filename and path.is_dir():
            path = path / self.filename
        if not path.exists():
            raise RewardFileError(
                f"{self.key!r} not found at {path}: provide {self.what}; {how}"
            )
        if self.kind == "file" and not path.is_file():
            raise RewardFileError(f"{self.key!r} at {path} is not a file: provide {self.what}; {how}")
        if self.kind == "dir" and not path.is_dir():
            raise RewardFileError(
                f"{self.key!r} at {path} is not a directory: provide {self.what}; {how}"
            )
        return path
