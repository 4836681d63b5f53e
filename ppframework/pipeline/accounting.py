"""What a pipeline's pruned blocks cost and removed: the weights each batch removed (the realised
ratio), the shapes each block ran with, and the FLOPs share of the probed blocks."""

from __future__ import annotations

import torch

from ppframework.pipeline.record import BlockEvent, PruningRecord
from ppframework.pipeline.state import PipelineState
from ppframework.types import BlockKind, BlockMask, Probe


class Accounting(PipelineState):
    """The pipeline's record of removed weights and block shapes, and the ratios computed from it."""

    def _probe_flops_scale(self, batch: int, seq: int) -> float:
        """Dense decoder FLOPs / dense FLOPs of the blocks that probe, for a (batch, seq) batch."""
        key = (batch, seq)
        if key not in self._probe_scales:
            probed = sum(self._flops.dense_block_flops(kind, batch, seq) for kind in self.targets)
            probed *= len(self.pruned_layers)
            dense = self._flops.dense_decoder_flops(batch, seq)
            self._probe_scales[key] = dense / probed if probed else 1.0
        return self._probe_scales[key]

    def _params_per_unit(self, kind: BlockKind) -> tuple[int, int]:
        """(parameters per query head / channel, parameters per key/value head)."""
        hidden = int(self.adapter.config.hidden_size)
        geo = self.adapter.geometry(kind)
        if kind is BlockKind.ATTENTION:
            return 2 * hidden * geo.unit_width, 2 * hidden * geo.unit_width
        return self.adapter.mlp_matrices * hidden, 0

    def total_prunable_params(self) -> int:
        """Weights of every decoder layer's attention and MLP projections (biases excluded)."""
        total = 0
        for kind in BlockKind:
            geo = self.adapter.geometry(kind)
            per_unit, per_kv = self._params_per_unit(kind)
            total += geo.units * per_unit + geo.num_kv_heads * per_kv
        return total * self.adapter.num_layers

    def _record(
        self, index: int, kind: BlockKind, mask: BlockMask, shape: torch.Size, probe: Probe | None
    ) -> None:
        per_unit, per_kv = self._params_per_unit(kind)
        geo = self.adapter.geometry(kind)
        removed = (geo.units - mask.n_kept) * per_unit
        kept_kv = geo.num_kv_heads
        if mask.kept_kv_heads is not None:
            kept_kv = int(mask.kept_kv_heads.numel())
            removed += (geo.num_kv_heads - kept_kv) * per_kv
        self.record.removed_params[-1] += removed * self._record_weight
        self.record.kept_units.setdefault((index, kind), []).append(mask.n_kept)
        self.record.events.append(
            BlockEvent(
                batch=self.batch_index,
                layer=index,
                kind=kind,
                batch_size=int(shape[0]),
                seq_len=int(shape[1]),
                kept_units=mask.n_kept,
                kept_kv_heads=kept_kv,
                probe_rows=0 if probe is None else int(probe.batch_index.numel()),
                probe_tokens=0 if probe is None else int(probe.token_index.numel()),
                row=self._row,
            )
        )

    def realised_ratio(self, skip_batches: int = 0) -> float:
        """Mean over recorded batches (after ``skip_batches``) of the fraction of prunable weights removed."""
        removed = self.record.removed_params[skip_batches:]
        if not removed:
            return 0.0
        return sum(removed) / len(removed) / self.total_prunable_params()

    def realised_ratio_model(self, skip_batches: int = 0) -> float:
        """The same removed weights as a fraction of every parameter of the model (embeddings and an
        untied LM head included; see :meth:`~ppframework.adapters.base.ModelAdapter.parameter_counts`)."""
        total = self.adapter.parameter_counts()["model"]
        return self.realised_ratio(skip_batches) * self.total_prunable_params() / total if total else 0.0

    def reset_record(self) -> None:
        """Forget the recorded masks (the history is kept)."""
        self.record = PruningRecord()
