"""``ppf run`` / ``ppf ablate``: dense vs each configured method on the same batches.

- :mod:`~ppframework.runner.session`: :func:`run` and :class:`RunSession` (one config's model,
  batches and calibration; evaluating a point).
- :mod:`~ppframework.runner.results`: the rows and the report, and reading a row back from JSON.
- :mod:`~ppframework.runner.measure`: a method's row from its perplexity, timing and FLOPs.
- :mod:`~ppframework.runner.settings`: the evaluation batches, the resolved settings, the environment.
- :mod:`~ppframework.runner.report`: the markdown table, the CSV and the JSON files.
- :mod:`~ppframework.runner.points`: the point store that makes sweeps resumable.
"""

from ppframework.runner.measure import method_row, pipeline_flops
from ppframework.runner.report import (
    format_table,
    try_write_report,
    warmup_phrase,
    window_bos_phrase,
    write_csv,
    write_report,
)
from ppframework.runner.results import MethodResult, RunReport
from ppframework.runner.session import RunSession, describe_error, run
from ppframework.runner.settings import environment, eval_batches, resolved_settings, scored_batches

__all__ = [
    "MethodResult",
    "RunReport",
    "RunSession",
    "describe_error",
    "environment",
    "eval_batches",
    "format_table",
    "method_row",
    "pipeline_flops",
    "resolved_settings",
    "run",
    "scored_batches",
    "try_write_report",
    "warmup_phrase",
    "window_bos_phrase",
    "write_csv",
    "write_report",
]
