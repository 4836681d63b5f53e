"""The shared gated-MLP runner: ``down(act(gate(x)) * up(x))`` on kept intermediate channels.

The defaults are the Hugging Face LLaMA layout (``gate_proj``/``up_proj``/``down_proj`` and the
module's ``act_fn``); a family with a fused gate/up projection (Phi-3) overrides
:meth:`MLPRunner.dense_gate_up` and :meth:`MLPRunner.sliced_gate_up_weight` only. A plain MLP
(OPT's ``fc2(act(fc1(x)))``) needs no skeleton: its :meth:`~ppframework.adapters.base.BlockRunner.run`
is one line.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ppframework.adapters.base import BlockCall, BlockRunner
from ppframework.adapters.probe_reuse import project_reusing
from ppframework.types import BlockGeometry


class MLPRunner(BlockRunner):
    """Gated MLP ``down(act(gate(x)) * up(x))`` on kept intermediate channels.

    Sliced path: the kept rows of gate and up are gathered into one weight (one matmul); with a
    :class:`~ppframework.adapters.probe_reuse.ProbeReuse` the probe's gate and up projections of the
    kept channels (exact per token) fill the probe's tokens instead of being recomputed.
    """

    def __init__(self, mlp: nn.Module, geometry: BlockGeometry) -> None:
        self.mlp = mlp
        self.geometry = geometry
        self.act: Callable[[torch.Tensor], torch.Tensor] = getattr(mlp, "act_fn", None) or mlp.activation_fn

    @property
    def out_proj(self) -> nn.Linear:
        return self.mlp.down_proj

    def dense_gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The full gate and up projections of ``x``."""
        return self.linear(x, self.mlp.gate_proj), self.linear(x, self.mlp.up_proj)

    def sliced_gate_up_weight(self, kept_units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One weight (and bias) computing the gate rows then the up rows of ``kept_units``."""
        mlp = self.mlp
        return self.gather("mlp.gate_up", (mlp.gate_proj, mlp.up_proj), (kept_units, kept_units))

    def run(self, x: torch.Tensor, call: BlockCall) -> torch.Tensor:
        act, kept_units = self.act, call.kept_units
        if kept_units is None:
            gate, up = self.dense_gate_up(x)
            return act(gate) * up
        weight, bias = self.sliced_gate_up_weight(kept_units)
        n = int(kept_units.numel())
        # With reuse only the projections are copied: the activation then runs on the same (B, T, 2n)
        # layout as without reuse. A vectorised activation computes a row's last elements on a scalar
        # path, so activations copied from the probe's differently shaped tensor would differ in the
        # last bit wherever n is not a multiple of the vector width.
        h = project_reusing(x, weight, bias, call.reuse, (kept_units, kept_units))
        return act(h[..., :n]) * h[..., n:]

    def probe(
        self, x: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, call: BlockCall
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The probe's activations and its gate and up projections (what the full pass may reuse)."""
        gate, up = self.dense_gate_up(x.index_select(0, rows).index_select(1, tokens))
        return self.act(gate) * up, (gate, up)
