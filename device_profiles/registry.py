"""The device profile registry: ``get(name_or_path)``; an unknown name lists the known ones."""
from __future__ import annotations

import os
from pathlib import Path

from runtime.errors import UnknownNameError

from .profile import DeviceProfile, load_profile_file

_HERE = Path(__file__).parent


def names() -> list[str]:
    return sorted(p.stem for p in _HERE.glob("*.toml"))


def get(name: str | os.PathLike) -> DeviceProfile:
    """A built-in profile by name (``rpi4``, ``host``, ...) or a user's profile by path (``*.toml``)."""
    s = str(name)
    if s.endswith(".toml") or os.sep in s:
        return load_profile_file(s)
    path = _HERE / f"{s}.toml"
    if not path.is_file():
        raise UnknownNameError("device profile", s, names())
    return load_profile_file(path)
