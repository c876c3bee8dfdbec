"""Device profiles: TOML files describing how to run on a device (providers, threads, targets). Torch-free."""
from .profile import DeviceProfile, load_profile_file, parse_profile
from .registry import get, names

__all__ = ["DeviceProfile", "get", "load_profile_file", "names", "parse_profile"]
