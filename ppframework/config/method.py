"""One pruning method (:class:`MethodConfig`): a preset merged with explicit settings, checked for
strategies that cannot work together, and the label it is shown under."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from ppframework.config.base import StrictModel
from ppframework.config.merge import merge_method
from ppframework.config.method_parts import HistoryConfig, PruningConfig, StageConfig, StrategiesConfig
from ppframework.config.presets import PER_BLOCK_DEFAULTS, PRESETS, pp_strategies


def method_label(name: str, ratio: float) -> str:
    """How a method is shown and keyed in results: ``<name> <ratio>%`` (e.g. ``pp 40%``)."""
    return f"{name} {ratio:.0%}"


ACTIVATION_METRICS = {"ppsp", "wanda-sp", "wanda", "flap", "flap-ppcode"}
"""Built-in channel metrics that need activations (from a probe or a calibration history)."""
PROBE_FUSIONS = {"importance-scaled", "none", "fixed", "completion"}
"""Built-in fusions that use the probe's activations."""
HISTORY_FUSIONS = {"importance-scaled", "history-only", "fixed", "completion"}
"""Built-in fusions that use the history's activations."""
BUILTIN_FUSIONS = PROBE_FUSIONS | HISTORY_FUSIONS
"""Every built-in fusion (third-party ones are not judged by :func:`method_inconsistency`)."""
BUILTIN_PROBES = {"residual", "random", "full", "none"}
"""Every built-in probe selection."""


def method_inconsistency(method: MethodConfig) -> str | None:
    """Why the built-in strategies of ``method`` cannot work together, or None.

    Only combinations of built-in strategy names are judged; third-party strategies are trusted.
    """
    if method.pruning.ratio == 0:
        return None
    if method.prefill == "dense" and method.decode == "dense":
        return (
            "prefill: 'dense' with decode: 'dense' prunes nothing (both phases run the unpruned layers); "
            "use decode 'frozen' to run decode steps on the masks the dense prefill decided"
        )
    if method.sequence_decode != "loop" and (method.decision != "sequence" or method.decode != "frozen"):
        return (
            f"sequence_decode: {method.sequence_decode!r} sets how the decode steps of decision 'sequence' "
            "run on each row's masks; it needs decision: 'sequence' and decode: 'frozen' (or leave "
            "sequence_decode 'loop')"
        )
    st = method.strategies
    probe, fusion, metric = st.select_probe.name, st.fuse_history.name, st.score_channels.name
    has_probe = probe != "none"
    has_history = method.history.init == "calibration"
    history_moves = has_history and method.history.update != "frozen"
    if st.allocate.name == "adaptive" and (probe in BUILTIN_PROBES - {"none"} or history_moves):
        return (
            "strategies.allocate: 'adaptive' ranks every block's scores before the first layer runs, which "
            "only static methods can do; use select_probe 'none' and history.update 'frozen' (or "
            "history.init 'none'), or allocate 'uniform'"
        )
    if st.allocate.name == "adaptive-calibration" and not has_history:
        return (
            "strategies.allocate: 'adaptive-calibration' decides the structure from the calibration "
            "history's scores; set history.init 'calibration', or use allocate 'uniform'"
        )
    if fusion not in BUILTIN_FUSIONS:
        return None
    if fusion == "fixed" and not (has_probe and has_history):
        return (
            "strategies.fuse_history: 'fixed' fuses probe and history; it needs a select_probe other than "
            "'none' and history.init 'calibration'"
        )
    if fusion == "none" and not has_probe and metric in ACTIVATION_METRICS:
        return (
            "strategies.fuse_history: 'none' uses the probe alone, but select_probe is 'none'; choose a "
            "probe (residual, random, full) or fuse_history 'history-only'"
        )
    for field, scorer in _scorers(st.score_channels.name, st.score_channels.params):
        problem = _metric_inconsistency(field, scorer, has_probe, has_history, fusion)
        if problem:
            return problem
    return None


def _scorers(metric: str, params: dict[str, Any]) -> list[tuple[str, Any]]:
    """(config path, stage config) of each scorer a method uses: the children of ``per-block`` (by
    block kind, defaults filled in), otherwise the one strategy."""
    path = "strategies.score_channels"
    if metric != "per-block":
        return [(path, StageConfig(name=metric, params=params))]
    scorers = []
    for kind in ("attention", "mlp"):
        try:
            spec = StageConfig.model_validate(params.get(kind, PER_BLOCK_DEFAULTS[kind]))
        except ValueError:  # malformed: the registry names the field when it builds the strategy
            continue
        scorers.append((f"{path}.params.{kind}", spec))
    return scorers


def _metric_inconsistency(
    field: str, scorer: StageConfig, has_probe: bool, has_history: bool, fusion: str
) -> str | None:
    """Why one scorer (``field`` its config path) cannot work with the method's probe, history and
    fusion, or None."""
    metric, params = scorer.name, scorer.params
    if metric in ("flap", "flap-ppcode") and (has_probe and fusion != "history-only" or not has_history):
        return (
            f"{field}: {metric!r} scores the calibration's fluctuation; use select_probe "
            "'none' (or fuse_history 'history-only') and history.init 'calibration'"
        )
    from_calibration = params.get("compensation_mean", "calibration") == "calibration" or not has_probe
    compensating = metric in ("ppsp", "wanda") and params.get("bias_compensation")
    if compensating and from_calibration and not has_history:
        return (
            f"{field}.params.bias_compensation: compensation adds back the calibration "
            "mean of the pruned channels, which needs history.init 'calibration'; set it, take the means "
            "from the probe (compensation_mean: probe, with a probe), or turn bias_compensation off"
        )
    if params.get("token_norm") and fusion != "none":
        return (
            f"{field}.params.token_norm: per-token normalised probe evidence is not in the units of the "
            f"calibration history that fuse_history {fusion!r} mixes it with; use fuse_history 'none' "
            "(and history.init 'none'), or turn token_norm off"
        )
    if metric in ACTIVATION_METRICS:
        from_probe = has_probe and fusion in PROBE_FUSIONS
        from_history = has_history and fusion in HISTORY_FUSIONS
        if not (from_probe or from_history):
            return (
                f"{field}: {metric!r} needs activations, but this method has neither a "
                f"probe feeding fuse_history {fusion!r} nor a calibration history; set history.init "
                "'calibration' or choose a probe"
            )
    return None


class MethodConfig(StrictModel):
    """One pruning method: a preset and/or explicit pruning, strategies and history settings."""

    preset: str | None = None
    name: str = ""
    description: str = ""
    pruning: PruningConfig = Field(default_factory=PruningConfig)
    strategies: StrategiesConfig = Field(default_factory=lambda: StrategiesConfig(**pp_strategies()))
    history: HistoryConfig = Field(default_factory=HistoryConfig)
    decode: Literal["frozen", "dense"] = Field(
        "frozen",
        description="decode steps of generate(): frozen = reuse the masks decided at prefill on sliced "
        "weights gathered once; dense = run them unpruned (prefill-only pruning)",
    )
    decision: Literal["batch", "sequence"] = Field(
        "batch",
        description="who a decision forward decides for: batch = one set of masks for the whole batch "
        "(the paper's); sequence = every row decides alone, from its own real tokens, as if the prompts "
        "came one at a time (the history updated after each row), and its decode steps run on its own "
        "kept weights (row by row; static methods decide for no batch and ignore it)",
    )
    prefill: Literal["pruned", "dense"] = Field(
        "pruned",
        description="what a decision forward computes: pruned = the method's probe, masks and sliced "
        "inference (the paper's); dense = the unpruned layers (exact logits and key/value cache), whose "
        "activations at every real token are the probe for scoring and history fusion; the masks decided "
        "from them serve the decode steps only",
    )
    sequence_decode: Literal["loop", "batched", "union"] = Field(
        "loop",
        description="decision 'sequence' only: how a decode step runs a batch of several rows; loop = "
        "each row alone on its own pinned weights; batched = every row on its own kept weights in one "
        "pass (stacked weights, batched matmuls; the same results up to float rounding; the loop when "
        "rows keep different numbers of units); union = the whole batch on the union of the rows' kept "
        "units (each row sees at least the units it chose)",
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, str):
            data = {"preset": data}
        if not isinstance(data, dict) or data.get("preset") is None:
            return data
        preset = data["preset"]
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(sorted(PRESETS))}")
        merged = merge_method({k: v for k, v in PRESETS[preset].items() if k != "description"}, data)
        merged.setdefault("name", preset)
        merged.setdefault("description", PRESETS[preset]["description"])
        return merged

    @model_validator(mode="after")
    def _consistent(self) -> MethodConfig:
        problem = method_inconsistency(self)
        if problem:
            raise ValueError(problem)
        return self

    @property
    def needs_calibration(self) -> bool:
        """Whether this method prunes and starts its history from a dense calibration."""
        return self.history.init == "calibration" and self.pruning.ratio > 0

    @property
    def label(self) -> str:
        """Short display name: ``name`` and the target ratio."""
        return method_label(self.name or self.preset or "method", self.pruning.ratio)
