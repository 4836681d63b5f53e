"""The shared attention runner: one skeleton that every family's attention block runs through.

``run`` = project (q, k, v of the kept heads) -> split heads -> q/k norms -> rotary -> key/value
cache -> attention (causal, padded, windowed, grouped-query or decode) -> merged heads. The defaults
are the Hugging Face LLaMA layout (``q_proj``/``k_proj``/``v_proj``/``o_proj``, grouped-query
attention, one fused gather of the kept q/k/v rows, probe reuse); a family overrides only the step it
does differently:

- :meth:`AttentionRunner.dense_qkv` / :meth:`AttentionRunner.sliced_qkv_weight`: fused projections
  (Phi-3's ``qkv_proj``);
- :meth:`AttentionRunner.project`: projections computed another way (OPT: one per projection,
  queries scaled before the scores);
- :meth:`AttentionRunner.kv_maps` / :meth:`AttentionRunner.store`: which key/value heads are
  computed and cached (OPT: those of the kept heads, or every head for a full cache).

Optional parts are read from the module: per-head ``q_norm``/``k_norm`` (Qwen3, Gemma 3, applied
before rotary), the sliding window (:func:`attention_window`), the rotary tables the adapter passes
(None: absolute positions), the scale (``scaling``); ``softcap`` (tanh soft-capping of the scores) is
set only by a family whose own attention applies it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ppframework.adapters.attention import (
    MIN_GROUPED_QUERY_POSITIONS,
    SDPA_GROUPED_QUERIES,
    HeadGroups,
    KVRun,
    biased_attention,
    causal_attention,
    causal_attention_by_runs,
    grouped_attention,
    kv_runs,
)
from ppframework.adapters.base import BlockCall, BlockRunner
from ppframework.adapters.gather import unit_channels
from ppframework.adapters.kv_cache import KVSlot
from ppframework.adapters.masks import position_bias
from ppframework.adapters.probe_reuse import probe_rotary, project_reusing
from ppframework.adapters.rotary import apply_rotary
from ppframework.types import BlockGeometry

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def attention_window(attn: nn.Module, config: Any) -> int | None:
    """The sliding window of one attention module (None: full attention).

    Families with per-layer types (Qwen2/3, Gemma 3) set ``sliding_window`` on each attention module
    (None on full-attention layers); Mistral and Phi-3 apply ``config.sliding_window`` to every layer.
    """
    if hasattr(attn, "sliding_window"):
        window = attn.sliding_window
    else:
        window = getattr(config, "sliding_window", None)
    return None if window is None else int(window)


class AttentionRunner(BlockRunner):
    """Attention of one layer on kept query heads (and optionally kept key/value groups).

    Sliced path: the kept rows of q, k and v are gathered into one weight (one matmul); with a
    :class:`~ppframework.adapters.probe_reuse.ProbeReuse` the probe's q/k/v projections (exact per
    token) fill the probe's tokens. The module's own ``q_norm``/``k_norm`` (when it has them)
    normalise each head before rotary; a sliding ``window`` comes from the module or the config.
    ``softcap`` (tanh soft-capping of the scores, Gemma 2 style) is None: set it only for a family
    whose own attention applies it (transformers' Gemma 3 keeps ``attn_logit_softcapping`` in its
    config but never applies it, so neither does this runner).
    """

    #: The last full-pass window bias, shared by every runner: (mask tensor, (seq, window, dtype,
    #: device), bias). Holding the mask keeps its identity unique while the entry lives.
    _full_bias: ClassVar[list[tuple[Any, tuple[Any, ...], torch.Tensor]]] = []
    #: Whether :meth:`project` can take the probe's q/k/v (so :meth:`probe` keeps them for reuse).
    reuses_probe: ClassVar[bool] = True

    def __init__(
        self, attn: nn.Module, geometry: BlockGeometry, layer_idx: int = 0, config: Any = None
    ) -> None:
        self.attn = attn
        self.geometry = geometry
        self.layer_idx = int(getattr(attn, "layer_idx", None) or layer_idx)
        self.scaling = float(getattr(attn, "scaling", geometry.unit_width**-0.5))
        config = config if config is not None else getattr(attn, "config", None)
        self.q_norm: nn.Module | None = getattr(attn, "q_norm", None)
        self.k_norm: nn.Module | None = getattr(attn, "k_norm", None)
        self.window: int | None = attention_window(attn, config)
        self.softcap: float | None = None
        self._kv_memo: tuple[Any, Any, torch.Tensor | None, torch.Tensor | None] | None = None
        self._groups_memo: tuple[torch.Tensor, HeadGroups] | None = None
        self._runs_memo: tuple[torch.Tensor, tuple[KVRun, ...] | None] | None = None
        self._dense_kv_index: torch.Tensor | None = None

    @property
    def out_proj(self) -> nn.Linear:
        return self.attn.o_proj

    @property
    def query_width(self) -> int:
        """Rows of the query projection (heads * head_dim)."""
        return self.geometry.units * self.geometry.unit_width

    # -- the family's steps ------------------------------------------------------------------------
    def dense_qkv(self, x: torch.Tensor) -> QKV:
        """The full q, k and v projections of ``x`` (before norms and rotary)."""
        attn = self.attn
        return self.linear(x, attn.q_proj), self.linear(x, attn.k_proj), self.linear(x, attn.v_proj)

    def sliced_qkv_weight(
        self, q_rows: torch.Tensor | None, kv_rows: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One weight (and bias) computing the q rows ``q_rows`` then the k and v rows ``kv_rows``
        (None: all rows of that projection)."""
        attn = self.attn
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        return self.gather("attn.qkv", projections, (q_rows, kv_rows, kv_rows))

    def project(self, x: torch.Tensor, call: BlockCall) -> QKV:
        """The (B, T, width) q, k and v of the kept heads (before norms and rotary): the dense
        projections when nothing is pruned, else one matmul with the fused sliced weight (the probe's
        tokens taken from ``call.reuse`` when it is usable)."""
        if call.kept_units is None and call.kept_kv_heads is None:
            return self.dense_qkv(x)
        q_rows = self.channels_of(call.kept_units)
        kv_rows, _ = self.kv_maps(call.kept_units, call.kept_kv_heads, x.device)
        weight, bias = self.sliced_qkv_weight(q_rows, kv_rows)
        qkv = project_reusing(x, weight, bias, call.reuse, (q_rows, kv_rows, kv_rows))
        n_q = self.query_width if q_rows is None else int(q_rows.numel())
        n_kv = (qkv.shape[-1] - n_q) // 2
        q, k, v = qkv.split((n_q, n_kv, n_kv), dim=-1)
        return q, k, v

    def store(
        self, slot: KVSlot, k: torch.Tensor, v: torch.Tensor, kept_units: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's (B, heads, T, d) keys/values in ``slot``; return what the queries
        attend to."""
        return slot.store(k, v)

    # -- the skeleton ------------------------------------------------------------------------------
    def run(self, x: torch.Tensor, call: BlockCall) -> torch.Tensor:
        q, k, v = self.project(x, call)
        return self._attend(q, k, v, call)

    def probe(
        self, x: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, call: BlockCall
    ) -> tuple[torch.Tensor, QKV | None]:
        """The probe's attention output and its q/k/v projections (what the full pass may reuse;
        None when :attr:`reuses_probe` is off).

        The probe's tokens attend among themselves at their true positions (rotary and, for a
        sliding-window layer, the window are those of ``tokens``)."""
        probe_x = x.index_select(0, rows).index_select(1, tokens)
        q, k, v = self.project(probe_x, BlockCall(call.attention_mask))
        probe = BlockCall(call.attention_mask, rotary=probe_rotary(call.rotary, rows, tokens))
        states = self._attend(q, k, v, probe, cache=False, positions=tokens, span=x.shape[1])
        return states, ((q, k, v) if self.reuses_probe else None)

    def _windowed(self, span: int) -> bool:
        """Whether the window cuts anything out of a sequence of ``span`` tokens."""
        return self.window is not None and span > self.window

    def _decision_bias(
        self,
        attention_mask: torch.Tensor | None,
        seq: int,
        positions: torch.Tensor | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Causal (+ window, + key padding) bias of a forward with nothing cached, over ``positions``
        (None: the columns). The full pass's bias is shared by every layer with the same window
        (one entry, for the last mask tensor); a probe's is built for it."""
        if positions is not None:
            return position_bias(positions, positions, attention_mask, self.window, dtype)
        shared = AttentionRunner._full_bias
        key = (seq, self.window, dtype, device)
        if shared and shared[0][0] is attention_mask and shared[0][1] == key:
            return shared[0][2]
        at = torch.arange(seq, device=device)
        bias = position_bias(at, at, attention_mask, self.window, dtype)
        shared[:] = [(attention_mask, key, bias)]
        return bias

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        call: BlockCall,
        cache: bool = True,
        positions: torch.Tensor | None = None,
        span: int | None = None,
    ) -> torch.Tensor:
        """Attention output (B, T, heads * d) from (B, T, width) projections (before norms and rotary).

        With the pipeline's :class:`KVSlot` set (and ``cache``), the rotated keys and values are stored
        in the model's cache and the queries attend to what it holds. ``positions`` (T,) are the
        tokens' positions when they are not the columns (the probe's), ``span`` the length of the
        sequence they come from (for the window)."""
        attention_mask, kept_units = call.attention_mask, call.kept_units
        batch, seq, _ = q.shape
        d = self.geometry.unit_width
        q = q.view(batch, seq, -1, d).transpose(1, 2)
        k = k.view(batch, seq, -1, d).transpose(1, 2)
        v = v.view(batch, seq, -1, d).transpose(1, 2)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if call.rotary is not None:
            cos, sin = call.rotary
            q = apply_rotary(q, cos, sin)
            k = apply_rotary(k, cos, sin)
        slot = self.kv_slot if cache else None
        if slot is not None:
            k, v = self.store(slot, k, v, kept_units)
        n_heads = q.shape[1]
        decoding = slot is not None and slot.past > 0
        special = self.softcap is not None or self._windowed(seq if span is None else span)
        if n_heads != k.shape[1] or kept_units is not None:
            _, kv_index = self.kv_maps(kept_units, call.kept_kv_heads, q.device)
            if kv_index is not None and decoding and self.softcap is None:
                groups = self._head_groups(kv_index, k.shape[1])
                bias = slot.bias(seq, k.shape[2], q.dtype, self.window)
                out = grouped_attention(q, k, v, groups, bias, self.scaling)
                return out.transpose(1, 2).reshape(batch, seq, n_heads * d)
            grouped = kv_index is not None and not decoding and not special
            runs = self._kv_runs(kv_index) if grouped and seq >= MIN_GROUPED_QUERY_POSITIONS else None
            if runs is not None:
                return causal_attention_by_runs(q, k, v, runs, attention_mask, call.attn_bias, self.scaling)
            if kv_index is not None:
                k = k.index_select(1, kv_index)
                v = v.index_select(1, kv_index)
        if decoding:
            bias = slot.bias(seq, k.shape[2], q.dtype, self.window)
            out = biased_attention(q, k, v, bias, self.scaling, self.softcap)
        elif special:
            bias = self._decision_bias(attention_mask, seq, positions, q.device, q.dtype)
            out = biased_attention(q, k, v, bias, self.scaling, self.softcap)
        else:  # nothing cached before this forward: the queries attend among themselves
            out = causal_attention(q, k, v, attention_mask, call.attn_bias, self.scaling)
        return out.transpose(1, 2).reshape(batch, seq, n_heads * d)

    def _kv_runs(self, kv_index: torch.Tensor) -> tuple[KVRun, ...] | None:
        """:func:`kv_runs` of ``kv_index``, remembered per tensor; None off CPU (the grouped form's
        speed and bit-identity are measured on CPU only) or before PyTorch 2.5."""
        if kv_index.device.type != "cpu" or not SDPA_GROUPED_QUERIES:
            return None
        memo = self._runs_memo
        if memo is None or memo[0] is not kv_index:
            memo = self._runs_memo = (kv_index, kv_runs(kv_index.tolist()))
        return memo[1]

    def _head_groups(self, kv_index: torch.Tensor, kv_heads: int) -> HeadGroups:
        """The query stacking of :func:`grouped_attention` for ``kv_index``, remembered per tensor."""
        memo = self._groups_memo
        if memo is None or memo[0] is not kv_index or memo[1].kv_heads != kv_heads:
            memo = self._groups_memo = (kv_index, HeadGroups.build(kv_index, kv_heads))
        return memo[1]

    def kv_maps(
        self, kept_units: torch.Tensor | None, kept_kv_heads: torch.Tensor | None, device: torch.device
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(k/v projection rows to compute or None for all, key/value head of each kept query head
        among the computed ones or None when that is the identity), remembered per mask.

        This default is grouped-query attention: ``kept_kv_heads`` None computes every key/value head
        and maps each kept query head to its group's."""
        geo = self.geometry
        if kept_units is None and kept_kv_heads is None:  # full weights (probe, dense): per device
            dense = self._dense_kv_index
            if dense is None or dense.device != device:
                dense = self._dense_kv_index = self._kv_index(None, None, device)
            return None, dense
        memo = self._kv_memo
        if memo is not None and memo[0] is kept_units and memo[1] is kept_kv_heads:
            return memo[2], memo[3]
        kv_rows = unit_channels(kept_kv_heads, geo.unit_width) if kept_kv_heads is not None else None
        if kept_units is not None and kept_kv_heads is kept_units and geo.group_size == 1:
            kv_index = None  # each kept head keeps its own key/value head, in the same order
        else:
            kv_index = self._kv_index(kept_units, kept_kv_heads, device)
        self._kv_memo = (kept_units, kept_kv_heads, kv_rows, kv_index)
        return kv_rows, kv_index

    def _kv_index(
        self, kept_units: torch.Tensor | None, kept_kv_heads: torch.Tensor | None, device: torch.device
    ) -> torch.Tensor:
        """For each kept query head, the index of its key/value head among the computed ones."""
        geo = self.geometry
        heads = kept_units if kept_units is not None else torch.arange(geo.units, device=device)
        kv_of_head = torch.div(heads, geo.group_size, rounding_mode="floor")
        if kept_kv_heads is None:
            return kv_of_head
        position = torch.full((geo.num_kv_heads,), -1, dtype=torch.long, device=device)
        position[kept_kv_heads] = torch.arange(kept_kv_heads.numel(), device=device)
        return position[kv_of_head]
