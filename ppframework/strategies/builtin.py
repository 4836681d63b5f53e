"""Registers every built-in strategy through the same hook third-party plugins use."""

from __future__ import annotations

from collections.abc import Callable

from ppframework.hookspecs import hookimpl
from ppframework.strategies.allocation import (
    AdaptiveAllocation,
    CalibrationAdaptiveAllocation,
    UniformAllocation,
)
from ppframework.strategies.flap_ppcode import FlapPPCodeScore
from ppframework.strategies.fusion import (
    CompletionFusion,
    FixedFusion,
    HistoryOnlyFusion,
    ImportanceScaledFusion,
    ProbeOnlyFusion,
)
from ppframework.strategies.griffin import GriffinScore
from ppframework.strategies.inference import MaskedInference, SlicedInference
from ppframework.strategies.layer_removal import BlockInfluenceRemoval
from ppframework.strategies.masking import StructuredMask
from ppframework.strategies.per_block import PerBlockScore
from ppframework.strategies.probe import FullBatchProbe, NoProbe, RandomProbe, ResidualProbe
from ppframework.strategies.scoring import FlapScore, MagnitudeScore, PPspScore, WandaSpScore
from ppframework.strategies.taylor import TaylorScore
from ppframework.strategies.wanda import WandaScore

BUILTIN_STRATEGIES: tuple[type, ...] = (
    UniformAllocation,
    AdaptiveAllocation,
    CalibrationAdaptiveAllocation,
    BlockInfluenceRemoval,
    ResidualProbe,
    RandomProbe,
    FullBatchProbe,
    NoProbe,
    PPspScore,
    WandaSpScore,
    FlapScore,
    FlapPPCodeScore,
    WandaScore,
    PerBlockScore,
    MagnitudeScore,
    GriffinScore,
    TaylorScore,
    ImportanceScaledFusion,
    ProbeOnlyFusion,
    HistoryOnlyFusion,
    FixedFusion,
    CompletionFusion,
    StructuredMask,
    SlicedInference,
    MaskedInference,
)


@hookimpl
def ppf_register_strategies(register: Callable[[type], None]) -> None:
    """Register the built-in strategies."""
    for cls in BUILTIN_STRATEGIES:
        register(cls)
