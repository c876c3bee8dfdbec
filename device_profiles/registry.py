"""The built-in device profiles, one TOML file each beside this module, in the project's one registry."""

from __future__ import annotations

import os
from pathlib import Path

from edgeshift.core.registry import Registry

from .profile import DeviceProfile, load_profile_file

_HERE = Path(__file__).parent


def _register_builtin() -> None:
    for path in sorted(_HERE.glob("*.toml")):
        PROFILES.add(path.stem, path)


PROFILES: Registry[Path] = Registry("device profile", load=_register_builtin)


def names() -> list[str]:
    return PROFILES.names()


def load_profile(name: str | os.PathLike) -> DeviceProfile:
    """A built-in profile by name (``rpi4``, ``host``, ...) or a user's profile by path (``*.toml``)."""
    s = str(name)
    if s.endswith(".toml") or os.sep in s:
        return load_profile_file(s)
    return load_profile_file(PROFILES.get(s))
