"""Device profiles: TOML files describing how to run on a device. Torch-free."""
