"""``edgeshift pipeline``: one config file drives variants -> portfolio -> bench -> simulate -> report."""

from .config import MethodChoice, PipelineConfig, load_config, parse_config
from .methods import build_variants
from .run import fraction_list, method_document, prepare_output, run_method, run_pipeline, summary_rows, validate

__all__ = [
    "MethodChoice",
    "PipelineConfig",
    "build_variants",
    "load_config",
    "parse_config",
    "fraction_list",
    "method_document",
    "prepare_output",
    "run_method",
    "run_pipeline",
    "summary_rows",
    "validate",
]
