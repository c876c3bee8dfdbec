import os
import sys

# tests import the helpers module directly
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "2")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Decoded datasets are cached under EDGESHIFT_CACHE: keep tests out of the user's cache."""
    monkeypatch.setenv("EDGESHIFT_CACHE", str(tmp_path / "edgeshift-cache"))
