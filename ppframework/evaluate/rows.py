"""One row of ``ppf eval``'s results: everything measured for one method (dense included).

The type every other part of the evaluation shares: the protocol fills rows, the efficiency, frontier,
tables and plots read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class EvalRow:
    """Everything measured for one method (dense included)."""

    method: str
    target_ratio: float
    layer_ratio: float = 0.0
    #: None when nothing that records decisions ran (perplexity and generation off); dense: 0.
    realised_ratio: float | None = None
    #: the removed weights as a fraction of every parameter of the model (embeddings included).
    realised_ratio_model: float | None = None
    #: the share of the decoder's prunable weights the decode steps removed (mean over generate calls
    #: of the generation tasks, else of the fidelity measures); None when no decode step was measured.
    decode_realised_ratio: float | None = None
    #: ``prefill: dense``: decision forwards (prompts, perplexity windows) run unpruned, so the
    #: realised ratio of a perplexity run is 0 by construction (tables say "dense prefill").
    dense_prefill: bool = False
    static: bool = False
    perplexity: float | None = None
    accuracy: dict[str, dict[str, float | None]] = field(default_factory=dict)
    mean_acc: float | None = None
    mean_acc_norm: float | None = None
    #: lm-evaluation-harness metrics per task (``acc``, ``acc_norm``, their stderr, ``n_items``, ...).
    lm_eval: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: mean ``acc`` over the harness tasks that report it.
    lm_eval_mean_acc: float | None = None
    #: the forwards the harness ran (rows and width of each, a digest of every row length).
    lm_eval_batches: dict[str, Any] = field(default_factory=dict)
    #: None when not measured (``evaluation.runtime.enabled: false``): shown as ``-``, ``null`` in
    #: results.json, no plot point; dense's is 1 when the runtime was measured.
    time_ratio: float | None = None
    #: interquartile range of the per-pair time ratios (method / dense of one interleaved pair).
    time_ratio_spread: float | None = None
    #: first and third quartile of the per-pair time ratios (the error bar of the runtime axis).
    time_ratio_q25: float | None = None
    time_ratio_q75: float | None = None
    #: True when the spread is at least the runtime reduction it reports (metrics/noise.py): the
    #: time ratio, PRR and PRR ratios of this row are then flagged, not presented as a finding.
    runtime_unresolved: bool = False
    decoder_time_ratio: float | None = None
    median_forward_s: float | None = None
    tokens_per_s: float | None = None
    flops: dict[str, float] = field(default_factory=dict)
    peak_memory_bytes: int | None = None
    prr: float | None = None
    accuracy_prr: float | None = None
    prr_ratios: dict[str, float] = field(default_factory=dict)
    accuracy_prr_ratios: dict[str, float] = field(default_factory=dict)
    generation: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: ``evaluation.fidelity``: top-1 and KL per prompt set, continuation perplexity per corpus and the
    #: mean top-1 (:func:`ppframework.generation.fidelity_eval.measure_fidelity`); None when not measured.
    fidelity: dict[str, Any] | None = None

    @property
    def ideal_time_ratio(self) -> float | None:
        """FLOPs-implied ratio of the whole forward (pruned + probe + LM head over dense); 1 for dense,
        None when the FLOPs were not counted (perplexity off)."""
        if "ideal_ratio_whole" in self.flops:
            return float(self.flops["ideal_ratio_whole"])
        return 1.0 if self.method == "dense" else None
