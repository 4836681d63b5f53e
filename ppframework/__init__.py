"""ppframework: online dynamic structured pruning of Hugging Face LLMs (Probe Pruning built in).

Public API::

    import ppframework as ppf
    cfg = ppf.load_config("configs/default.yaml")
    model, tok = ppf.load_model(cfg.model.name)   # or ppf.load_model_from_config(cfg.model): device_map too
    pipe = ppf.build_pipeline(model, cfg, tokenizer=tok)
    with pipe:
        logits = model(input_ids, use_cache=False).logits
"""

from ppframework.api import build_pipeline, calibration_history, load_config
from ppframework.config import MethodConfig, RunConfig, preset
from ppframework.errors import ConfigError
from ppframework.export import export_pruned, load_pipeline, load_pruned
from ppframework.hookspecs import hookimpl
from ppframework.models import load_model, load_model_from_config
from ppframework.pipeline import Pipeline
from ppframework.runner import run

__all__ = [
    "ConfigError",
    "MethodConfig",
    "Pipeline",
    "RunConfig",
    "build_pipeline",
    "calibration_history",
    "export_pruned",
    "hookimpl",
    "load_config",
    "load_model",
    "load_model_from_config",
    "load_pipeline",
    "load_pruned",
    "preset",
    "run",
]
__version__ = "0.1.0"
