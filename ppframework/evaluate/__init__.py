"""``ppf eval``: the paper's protocol as one command (docs/evaluation.md).

The package, by concept (each module imports only those above it in this list):

* :mod:`~ppframework.evaluate.rows`: :class:`EvalRow`, everything measured for one method.
* :mod:`~ppframework.evaluate.timing`: interleaved dense/method runtime (:func:`time_against_dense`).
* :mod:`~ppframework.evaluate.efficiency`: PRR and its ratios against the baselines.
* :mod:`~ppframework.evaluate.frontier`: the efficiency frontier (perplexity at equal measured runtime).
* :mod:`~ppframework.evaluate.report`: :class:`EvalReport`, the rows with their settings, and its JSON.
* :mod:`~ppframework.evaluate.tables`: the markdown tables (results.md);
  :mod:`~ppframework.evaluate.csv_rows`: results.csv's rows.
* :mod:`~ppframework.evaluate.plots`: the PNG plots; :mod:`~ppframework.evaluate.writing`: every file
  of a report, each written atomically.
* :mod:`~ppframework.evaluate.protocol`: :func:`evaluate`, what is checked, loaded and measured, in which
  order.
"""

from ppframework.evaluate.csv_rows import EVAL_CSV_COLUMNS
from ppframework.evaluate.efficiency import accuracy_source, add_efficiency, default_baselines
from ppframework.evaluate.frontier import FrontierReport, analyse_frontier, format_frontier
from ppframework.evaluate.plots import write_plots
from ppframework.evaluate.protocol import check_tasks, evaluate, request_max_length
from ppframework.evaluate.report import EvalReport
from ppframework.evaluate.rows import EvalRow
from ppframework.evaluate.tables import (
    fidelity_table,
    format_eval_table,
    generation_table,
    lm_eval_table,
    noise_note,
    settings_block,
)
from ppframework.evaluate.timing import RuntimeResult, make_layers, time_against_dense
from ppframework.evaluate.writing import generations_file, write_eval_report

__all__ = [
    "EVAL_CSV_COLUMNS",
    "EvalReport",
    "EvalRow",
    "FrontierReport",
    "RuntimeResult",
    "accuracy_source",
    "add_efficiency",
    "analyse_frontier",
    "check_tasks",
    "default_baselines",
    "evaluate",
    "fidelity_table",
    "format_eval_table",
    "format_frontier",
    "generation_table",
    "generations_file",
    "lm_eval_table",
    "make_layers",
    "noise_note",
    "request_max_length",
    "settings_block",
    "time_against_dense",
    "write_eval_report",
    "write_plots",
]
