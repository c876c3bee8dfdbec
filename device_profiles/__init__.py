"""Device profiles: TOML files describing how to run on a device (providers, threads, targets). Torch-free."""

from .profile import DeviceProfile, SessionPlan, cpu_profile, load_profile_file, parse_profile, plan_session
from .registry import PROFILES, load_profile, names

__all__ = [
    "PROFILES",
    "DeviceProfile",
    "SessionPlan",
    "cpu_profile",
    "load_profile",
    "load_profile_file",
    "names",
    "parse_profile",
    "plan_session",
]
