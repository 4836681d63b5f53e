"""LLaMA-like decoder layers: LLaMA 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM (grouped-query attention included).

The attention runner also covers what later families add on top of LLaMA: per-head q/k RMSNorms
(Qwen3, Gemma 3: the model's own ``q_norm``/``k_norm`` modules, applied before rotary), sliding-window
attention (Mistral, Qwen2/3 ``layer_types``, Gemma 3 local layers: each layer's own window, on the
probe's true positions, the full pass and decode steps), partial rotary (Phi-3 style configs) and
tanh soft-capping of the attention scores (for families whose attention applies it; see
:class:`LlamaAttentionRunner`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from ppframework.adapters.attention import (
    MIN_GROUPED_QUERY_POSITIONS,
    SDPA_GROUPED_QUERIES,
    HeadGroups,
    KVRun,
    biased_attention,
    causal_attention_by_runs,
    grouped_attention,
    kv_runs,
    position_bias,
)
from ppframework.adapters.base import (
    BlockRunner,
    ModelAdapter,
    ProbeReuse,
    attend,
    fill_outside_probe,
    probe_rotary,
    unit_channels,
)
from ppframework.errors import ConfigError
from ppframework.types import BlockGeometry, BlockKind


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the last dimension: (a, b) -> (-b, a)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` (B, H, T, d) with ``cos``/``sin`` (B or 1, T, r).

    With ``r < d`` (partial rotary) only the first ``r`` features rotate; the rest pass through.
    """
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        head, tail = x[..., :rot], x[..., rot:]
        return torch.cat((_rotated(head, cos, sin), tail), dim=-1)
    return _rotated(x, cos, sin)


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` without building ``rotate_half(x)``: the first half is
    ``x1 * cos - x2 * sin`` (IEEE negation is exact, so ``a + (-b) * c == a - b * c``), the second
    ``x2 * cos + x1 * sin``; the same values in fewer passes over memory."""
    width = x.shape[-1]
    if width % 2:
        return x * cos + rotate_half(x) * sin
    half = width // 2
    out = x * cos
    out[..., :half].sub_(x[..., half:] * sin[..., :half])
    out[..., half:].add_(x[..., :half] * sin[..., half:])
    return out


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


def linear_into(
    weight: torch.Tensor, bias: torch.Tensor | None
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """``compute(x2d, out2d)`` writing ``F.linear(x2d, weight, bias)`` into ``out2d`` (no temporary)."""

    def compute(x2d: torch.Tensor, out2d: torch.Tensor) -> None:
        if bias is None:
            torch.mm(x2d, weight.t(), out=out2d)
        else:
            torch.addmm(bias, x2d, weight.t(), out=out2d)

    return compute


class LlamaAttentionRunner(BlockRunner):
    """Attention of a LLaMA-like layer on kept query heads (and optionally kept key/value groups).

    Sliced path: the kept rows of q, k and v are gathered into one weight (one matmul); with a
    :class:`ProbeReuse` the probe's q/k/v projections (exact per token) fill the probe's tokens.

    The module's own ``q_norm``/``k_norm`` (when it has them) normalise each head before rotary; a
    sliding ``window`` (see :func:`attention_window`) comes from the module or the config. ``softcap``
    (tanh soft-capping of the scores, Gemma 2 style) is None: set it only for a family whose own
    attention applies it (transformers' Gemma 3 keeps ``attn_logit_softcapping`` in its config but
    never applies it, so neither does this runner). Subclasses with fused projections override
    :meth:`dense_qkv` and :meth:`sliced_qkv_weight`.
    """

    #: The last full-pass window bias, shared by every runner: (mask tensor, (seq, window, dtype,
    #: device), bias). Holding the mask keeps its identity unique while the entry lives.
    _full_bias: ClassVar[list[tuple[Any, tuple[Any, ...], torch.Tensor]]] = []

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

    def dense_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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

    def pre_output(
        self,
        x: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None,
        attn_bias: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        kept_units: torch.Tensor | None = None,
        kept_kv_heads: torch.Tensor | None = None,
        reuse: ProbeReuse | None = None,
    ) -> torch.Tensor:
        if kept_units is None and kept_kv_heads is None:
            q, k, v = self.dense_qkv(x)
            return self._attend(q, k, v, attention_mask, attn_bias, rotary, None, None)
        q_rows = self.channels_of(kept_units)
        kv_rows, _ = self._kv_maps(kept_units, kept_kv_heads, x.device)
        weight, bias = self.sliced_qkv_weight(q_rows, kv_rows)
        if reuse is not None and reuse.usable_for(x):
            qkv = x.new_empty(*x.shape[:-1], weight.shape[0])
            probe_q, probe_k, probe_v = reuse.values
            parts = [
                t if rows is None else t.index_select(-1, rows)
                for t, rows in ((probe_q, q_rows), (probe_k, kv_rows), (probe_v, kv_rows))
            ]
            fill_outside_probe(x, qkv, linear_into(weight, bias), reuse, torch.cat(parts, dim=-1))
        else:
            qkv = torch.nn.functional.linear(x, weight, bias)
        n_q = self.query_width if q_rows is None else int(q_rows.numel())
        n_kv = (qkv.shape[-1] - n_q) // 2
        q, k, v = qkv.split((n_q, n_kv, n_kv), dim=-1)
        return self._attend(q, k, v, attention_mask, attn_bias, rotary, kept_units, kept_kv_heads)

    def probe_forward(
        self,
        x: torch.Tensor,
        rows: torch.Tensor,
        tokens: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        keep_for_reuse: bool = False,
    ) -> tuple[torch.Tensor, ProbeReuse | None]:
        """The probe's attention output; with ``keep_for_reuse`` also its q/k/v projections.

        The probe's tokens attend among themselves at their true positions (rotary and, for a
        sliding-window layer, the window are those of ``tokens``)."""
        probe_x = x.index_select(0, rows).index_select(1, tokens)
        q, k, v = self.dense_qkv(probe_x)
        rot = probe_rotary(rotary, rows, tokens)
        states = self._attend(
            q, k, v, attention_mask, None, rot, None, None, cache=False, positions=tokens, span=x.shape[1]
        )
        return states, (ProbeReuse.build(x, rows, tokens, (q, k, v)) if keep_for_reuse else None)

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
        shared = LlamaAttentionRunner._full_bias
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
        attention_mask: torch.Tensor | None,
        attn_bias: torch.Tensor | None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        kept_units: torch.Tensor | None,
        kept_kv_heads: torch.Tensor | None,
        cache: bool = True,
        positions: torch.Tensor | None = None,
        span: int | None = None,
    ) -> torch.Tensor:
        """Attention output (B, T, heads * d) from (B, T, width) projections (before norms and rotary).

        With the pipeline's :class:`KVSlot` set (and ``cache``), the rotated keys and values are stored
        in the model's cache and the queries attend to what it holds. ``positions`` (T,) are the
        tokens' positions when they are not the columns (the probe's), ``span`` the length of the
        sequence they come from (for the window)."""
        batch, seq, _ = q.shape
        d = self.geometry.unit_width
        q = q.view(batch, seq, -1, d).transpose(1, 2)
        k = k.view(batch, seq, -1, d).transpose(1, 2)
        v = v.view(batch, seq, -1, d).transpose(1, 2)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if rotary is not None:
            cos, sin = rotary
            q = apply_rotary(q, cos, sin)
            k = apply_rotary(k, cos, sin)
        slot = self.kv_slot if cache else None
        if slot is not None:
            k, v = slot.store(k, v)
        n_heads = q.shape[1]
        decoding = slot is not None and slot.past > 0
        special = self.softcap is not None or self._windowed(seq if span is None else span)
        if n_heads != k.shape[1] or kept_units is not None:
            _, kv_index = self._kv_maps(kept_units, kept_kv_heads, q.device)
            if kv_index is not None and decoding and self.softcap is None:
                groups = self._head_groups(kv_index, k.shape[1])
                bias = slot.bias(seq, k.shape[2], q.dtype, self.window)
                out = grouped_attention(q, k, v, groups, bias, self.scaling)
                return out.transpose(1, 2).reshape(batch, seq, n_heads * d)
            grouped = kv_index is not None and not decoding and not special
            runs = self._kv_runs(kv_index) if grouped and seq >= MIN_GROUPED_QUERY_POSITIONS else None
            if runs is not None:
                return causal_attention_by_runs(q, k, v, runs, attention_mask, attn_bias, self.scaling)
            if kv_index is not None:
                k = k.index_select(1, kv_index)
                v = v.index_select(1, kv_index)
        if decoding:
            bias = slot.bias(seq, k.shape[2], q.dtype, self.window)
            out = biased_attention(q, k, v, bias, self.scaling, self.softcap)
        elif special:
            bias = self._decision_bias(attention_mask, seq, positions, q.device, q.dtype)
            out = biased_attention(q, k, v, bias, self.scaling, self.softcap)
        else:
            out = attend(q, k, v, attention_mask, attn_bias, self.scaling, slot)
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

    def _kv_maps(
        self, kept_units: torch.Tensor | None, kept_kv_heads: torch.Tensor | None, device: torch.device
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(k/v projection rows to compute or None for all, key/value head of each kept query head
        among the computed ones or None when that is the identity), remembered per mask."""
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


class LlamaMLPRunner(BlockRunner):
    """Gated MLP ``down(act(gate(x)) * up(x))`` on kept intermediate channels.

    Sliced path: the kept rows of gate and up are gathered into one weight (one matmul); with a
    :class:`ProbeReuse` the probe's gate and up projections of the kept channels (exact per token)
    fill the probe's tokens instead of being recomputed. Subclasses with a fused gate/up projection override
    :meth:`dense_gate_up` and :meth:`sliced_gate_up_weight`.
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

    def pre_output(
        self,
        x: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None,
        attn_bias: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        kept_units: torch.Tensor | None = None,
        kept_kv_heads: torch.Tensor | None = None,
        reuse: ProbeReuse | None = None,
    ) -> torch.Tensor:
        act = self.act
        if kept_units is None:
            gate, up = self.dense_gate_up(x)
            return act(gate) * up
        weight, bias = self.sliced_gate_up_weight(kept_units)
        n = int(kept_units.numel())
        if reuse is not None and reuse.usable_for(x):
            # Only the projections are copied: the activation then runs on the same (B, T, 2n)
            # layout as without reuse. A vectorised activation computes a row's last elements on a
            # scalar path, so activations copied from the probe's differently shaped tensor would
            # differ in the last bit wherever n is not a multiple of the vector width.
            gate, up = reuse.values
            probe_h = torch.cat((gate.index_select(-1, kept_units), up.index_select(-1, kept_units)), dim=-1)
            h = x.new_empty(*x.shape[:-1], 2 * n)
            fill_outside_probe(x, h, linear_into(weight, bias), reuse, probe_h)
        else:
            h = torch.nn.functional.linear(x, weight, bias)
        return act(h[..., :n]) * h[..., n:]

    def probe_forward(
        self,
        x: torch.Tensor,
        rows: torch.Tensor,
        tokens: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        keep_for_reuse: bool = False,
    ) -> tuple[torch.Tensor, ProbeReuse | None]:
        """The probe's activations; with ``keep_for_reuse`` also its gate and up projections."""
        if not keep_for_reuse:
            states, _ = super().probe_forward(x, rows, tokens, attention_mask=attention_mask, rotary=rotary)
            return states, None
        gate, up = self.dense_gate_up(x.index_select(0, rows).index_select(1, tokens))
        return self.act(gate) * up, ProbeReuse.build(x, rows, tokens, (gate, up))


class LlamaLikeAdapter(ModelAdapter):
    """Pre-norm decoder layers with RMSNorm, rotary attention (GQA aware) and a gated MLP.

    Covers LLaMA 2/3, Mistral (sliding window included), Qwen2/Qwen2.5 (``qwen2``), Qwen3 (per-head
    q/k norms) and SmolLM. Subclasses (Phi-3, Gemma 3) change the runners or the norms around blocks.
    """

    family = "llama"
    model_types: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "smollm", "smollm2")
    attention_runner: type[LlamaAttentionRunner] = LlamaAttentionRunner
    mlp_runner: type[LlamaMLPRunner] = LlamaMLPRunner

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def geometry(self, kind: BlockKind) -> BlockGeometry:
        cfg = self.config
        if kind is BlockKind.ATTENTION:
            heads = int(cfg.num_attention_heads)
            kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
            head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
            return BlockGeometry(kind, units=heads, unit_width=head_dim, num_kv_heads=kv)
        return BlockGeometry(kind, units=int(cfg.intermediate_size), unit_width=1)

    def runner(self, layer_index: int, kind: BlockKind) -> BlockRunner:
        layer = self.layers[layer_index]
        if kind is BlockKind.ATTENTION:
            return self.attention_runner(layer.self_attn, self.geometry(kind), layer_index, self.config)
        return self.mlp_runner(layer.mlp, self.geometry(kind))

    def block_input(self, layer: nn.Module, kind: BlockKind, hidden: torch.Tensor) -> torch.Tensor:
        norm = layer.input_layernorm if kind is BlockKind.ATTENTION else layer.post_attention_layernorm
        return norm(hidden)

    def block_residual(
        self, layer: nn.Module, kind: BlockKind, hidden: torch.Tensor, block_out: torch.Tensor
    ) -> torch.Tensor:
        return hidden + block_out

    def rotary(self, layer_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        rotary = layer_kwargs.get("position_embeddings")
        if rotary is None:
            raise ConfigError(
                "model: the LLaMA-like layers were called without `position_embeddings`; this "
                "transformers version is not supported (use transformers >= 5)."
            )
        return rotary

    def check_supported(self, seq_len: int) -> None:
        cfg = self.config
        types = set(getattr(cfg, "layer_types", None) or ())
        unknown = sorted(types - {"full_attention", "sliding_attention"})
        if unknown:
            raise ConfigError(
                f"model.name: layer types {unknown} (config.layer_types) are not supported; the pruned "
                "path runs full and sliding-window attention layers only."
            )
