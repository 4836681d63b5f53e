"""The start of every forward of the model: the backbone's pre-hook reads the batch (masks, padding,
positions, the cache it continues), checks it, extends the history for a longer input, and describes
it to the pipeline's layers (a decision forward, or a decode step of the last prefill)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ppframework.adapters.kv_cache import cache_length
from ppframework.devices import execution_device
from ppframework.pipeline.accounting import Accounting
from ppframework.pipeline.allocation import Allocation
from ppframework.pipeline.batch import _Batch
from ppframework.pipeline.decode import DecodeSteps
from ppframework.positions import row_shifts

logger = logging.getLogger(__package__)  # the package's logger: its lines keep the name ppframework.pipeline


class ForwardHook(Accounting, Allocation, DecodeSteps):
    """The backbone's forward pre-hook (:meth:`_on_forward`)."""

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        """Describe this forward to the layers (``self._batch``); keeps the call's arguments, except
        ``use_cache=False`` when nothing will continue an uncached forward."""
        self._read_later_checks()
        ref = kwargs.get("input_ids", args[0] if args else None)
        if ref is None:
            ref = kwargs.get("inputs_embeds")
        batch, seq = ref.shape[:2]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError(
                "ppframework needs a 2-D attention_mask (batch, seq) of 1 for tokens, 0 for padding; a "
                "4-D mask comes from a static cache (generate(cache_implementation='static')), which the "
                "pipeline does not support: use the default dynamic cache"
            )
        past = cache_length(cache)
        if past > 0:
            self._batch = self._decode_batch(cache, past, batch, seq, mask, ref.device)
            return args, kwargs
        self._end_decode()
        if cache is None and kwargs.get("use_cache") is not True:
            kwargs["use_cache"] = False  # nothing will continue this forward: no cache to fill
        if mask is None:
            mask = torch.ones(batch, seq, dtype=torch.long, device=ref.device)
        elif mask.shape[1] != seq:
            raise ValueError(
                f"attention_mask: {mask.shape[1]} columns for {seq} tokens and nothing cached; "
                "a forward without a cache needs one mask column per token"
            )
        if self.history is not None and self.history.max_positions and seq > self.history.max_positions:
            self._extend_history(seq)
        self.adapter.check_supported(seq)
        real = mask.bool()
        has_padding = not bool(real.all())
        positions = kwargs.get("position_ids")
        if positions is None and has_padding:  # without padding the model's own positions are columns
            positions = self.adapter.default_positions(mask)
        shift = row_shifts(mask, positions) if positions is not None and positions.dim() == 2 else None
        if shift is not None:
            mask = shift.to_positions(mask)
            real = mask.bool()
        self._batch = _Batch(
            mask,
            real.any(dim=0),
            has_padding,
            real.sum(dim=0),
            shift=shift,
            probe_flops_scale=self._probe_flops_scale(batch, seq),
            row_lengths=[int(n) for n in real.sum(dim=1).tolist()] if self.per_row and batch > 1 else None,
        )
        self.batch_index += 1
        self.record.removed_params.append(0.0)
        if self.per_row:
            self.last_row_masks = []
        if self._allocate_per_batch:
            self.block_ratios = self._allocate(None, seq, self.batch_index)
        return args, kwargs

    def _extend_history(self, seq: int) -> None:
        """An input longer than the history: extend it (``history.beyond: extend``) or refuse."""
        assert self.history is not None
        known = self.history.max_positions
        if self.method.history.beyond == "refuse":
            raise ValueError(
                f"sequence length {seq} exceeds the history's {known} positions; calibrate with "
                "calibration.seq_len >= the longest input (data.seq_len, prompts), or set "
                "history.beyond: extend"
            )
        logger.info(
            "%s: input of %d tokens past the history's %d positions; positions %d-%d start from the mean "
            "of the calibrated positions (history.beyond: extend)",
            self.method.label,
            seq,
            known,
            known,
            seq - 1,
        )
        self.history.extend(seq)
        self.history.place(lambda layer: execution_device(self.adapter.layers[layer]))
