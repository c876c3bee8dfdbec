"""Layer pruning (LayerPrune): rank removable layers and blocks, remove them in one shot, fine-tune."""

from .candidates import Candidate, find_candidates, remove_candidates
from .criteria import CRITERIA, get, names

__all__ = ["CRITERIA", "Candidate", "find_candidates", "get", "names", "remove_candidates"]
