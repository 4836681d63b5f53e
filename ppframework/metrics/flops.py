"""Analytic FLOPs of the decoder forward, from the shapes actually used (no profiler).

Conventions (every function here follows them):

* A multiply-add counts as **2 FLOPs**; a ``(m, k) @ (k, n)`` matmul costs ``2 * m * k * n``.
* Only the matmuls are counted: projections, the attention scores ``Q K^T`` and the weighted
  values ``A V``, and the LM head. Norms, rotary embeddings, softmax, activations, the gating
  product, residual adds, biases and the embedding lookup are ignored (they are O(B*T*D), a few
  percent at most of a layer's matmul work).
* Causal attention is counted as the **full T x T square**, as SDPA computes it: scores and values
  each cost ``2 * B * heads * T * T * head_dim``.
* The probe forward runs a block up to, not including, its output projection, on ``k_B`` rows and
  ``k_T`` tokens with the full (unpruned) weights: attention q/k/v projections plus attention among
  the probe tokens; MLP: the input matrices (gate and up, or fc1), no down projection.
* A block that is not pruned for a batch (a skipped layer) costs its dense FLOPs.

The numbers are what a pruned forward *ideally* saves; the measured runtime ratio also includes
weight gathering, probe selection and kernel efficiency at the smaller shapes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from ppframework.types import BlockGeometry, BlockKind


def _count(value: Any) -> int:
    """An integer count from an int or from a tensor of indices (its ``numel``)."""
    numel = getattr(value, "numel", None)
    if callable(numel):
        return int(numel())
    return int(value)


def attention_flops(B: int, T: int, D: int, q_heads: int, kv_heads: int, head_dim: int) -> int:
    """FLOPs of one attention block on ``B`` sequences of ``T`` tokens.

    ``q_proj``: ``2*B*T*D*(q_heads*head_dim)``; ``k_proj`` and ``v_proj``: ``2*B*T*D*(kv_heads*head_dim)``
    each; ``o_proj``: ``2*B*T*(q_heads*head_dim)*D``; scores and values: ``2 * 2*B*q_heads*T*T*head_dim``
    (causal masking is counted as the full square, as SDPA computes it; key/value heads shared by a
    query group are counted once per query head).
    """
    q_width = q_heads * head_dim
    kv_width = kv_heads * head_dim
    projections = 2 * B * T * D * q_width + 2 * (2 * B * T * D * kv_width) + 2 * B * T * q_width * D
    attention = 2 * (2 * B * q_heads * T * T * head_dim)
    return projections + attention


def mlp_flops(B: int, T: int, D: int, channels: int, mlp_matrices: int) -> int:
    """FLOPs of one MLP block: ``mlp_matrices * 2*B*T*D*channels``.

    ``mlp_matrices`` counts every weight matrix of the block, the output projection included (3 for
    the gated LLaMA MLP: gate, up, down; 2 for OPT: fc1, fc2). The activation and the elementwise
    gating product are ignored.
    """
    return mlp_matrices * 2 * B * T * D * channels


def attention_probe_flops(rows: int, tokens: int, D: int, q_heads: int, kv_heads: int, head_dim: int) -> int:
    """FLOPs of the attention probe: q, k, v projections and attention among the probe tokens, no o_proj."""
    return (
        attention_flops(rows, tokens, D, q_heads, kv_heads, head_dim)
        - 2 * rows * tokens * q_heads * head_dim * D
    )


def mlp_probe_flops(rows: int, tokens: int, D: int, channels: int, mlp_matrices: int) -> int:
    """FLOPs of the MLP probe: the ``mlp_matrices - 1`` input matrices only (gate + up, or fc1)."""
    return mlp_flops(rows, tokens, D, channels, mlp_matrices - 1)


def probe_flops(
    kind: BlockKind,
    rows: int,
    tokens: int,
    D: int,
    *,
    q_heads: int = 0,
    kv_heads: int = 0,
    head_dim: int = 0,
    channels: int = 0,
    mlp_matrices: int = 3,
) -> int:
    """FLOPs of one block's probe forward on ``rows`` sequences x ``tokens`` positions, full weights.

    Attention uses ``q_heads``, ``kv_heads`` and ``head_dim`` (all heads of the block); the MLP uses
    ``channels`` and ``mlp_matrices``. Zero rows or tokens (no probe) cost nothing.
    """
    if rows <= 0 or tokens <= 0:
        return 0
    if BlockKind(kind) is BlockKind.ATTENTION:
        return attention_probe_flops(rows, tokens, D, q_heads, kv_heads, head_dim)
    return mlp_probe_flops(rows, tokens, D, channels, mlp_matrices)


def lm_head_flops(B: int, T: int, D: int, vocab: int) -> int:
    """FLOPs of the LM head on every position: ``2*B*T*D*vocab``."""
    return 2 * B * T * D * vocab


@dataclass
class BlockShape:
    """What one block actually computed for one batch.

    Attributes:
        kind: attention or MLP.
        batch: sequences in the batch (B).
        seq: tokens per sequence (T).
        hidden: model width (D).
        q_heads: query heads kept (attention).
        kv_heads: key/value heads computed (attention).
        head_dim: width of a head (attention).
        channels: intermediate channels kept (MLP).
        mlp_matrices: weight matrices of the MLP, output projection included (3 gated, 2 OPT).
    """

    kind: BlockKind
    batch: int
    seq: int
    hidden: int
    q_heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    channels: int = 0
    mlp_matrices: int = 3

    def flops(self) -> int:
        """FLOPs of the block's forward with these shapes."""
        if BlockKind(self.kind) is BlockKind.ATTENTION:
            return attention_flops(
                self.batch, self.seq, self.hidden, self.q_heads, self.kv_heads, self.head_dim
            )
        return mlp_flops(self.batch, self.seq, self.hidden, self.channels, self.mlp_matrices)

    def probe_flops(self) -> int:
        """FLOPs of a probe forward with these shapes (``batch`` = probe rows, ``seq`` = probe tokens)."""
        return probe_flops(
            self.kind,
            self.batch,
            self.seq,
            self.hidden,
            q_heads=self.q_heads,
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            channels=self.channels,
            mlp_matrices=self.mlp_matrices,
        )


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


@dataclass
class FlopsReport:
    """FLOPs summed over the counted batches.

    Attributes:
        dense: FLOPs of the dense decoder layers on the same batches.
        pruned: FLOPs the decoder layers actually spent (pruned blocks at their kept sizes, blocks
            that were not pruned at their dense cost); the probes are *not* included.
        probe: FLOPs of the probe forwards.
        lm_head: FLOPs of the LM head (the same dense or pruned).
        batches: number of batches counted.
        tokens: sequences x tokens over the counted batches.
    """

    dense: int
    pruned: int
    probe: int
    lm_head: int
    batches: int = 0
    tokens: int = 0

    @property
    def probe_share(self) -> float:
        """Probe FLOPs as a share of the dense decoder FLOPs (NaN when nothing was counted)."""
        return _ratio(self.probe, self.dense)

    @property
    def ideal_ratio(self) -> float:
        """``(pruned + probe) / dense`` over the decoder layers: the ideal runtime ratio."""
        return _ratio(self.pruned + self.probe, self.dense)

    @property
    def ideal_ratio_whole(self) -> float:
        """``(pruned + probe + lm_head) / (dense + lm_head)``: the whole forward (embedding ignored)."""
        return _ratio(self.pruned + self.probe + self.lm_head, self.dense + self.lm_head)

    def to_dict(self) -> dict[str, float | int]:
        """The fields and the derived ratios, for JSON reports."""
        out: dict[str, float | int] = asdict(self)
        out.update(
            probe_share=self.probe_share,
            ideal_ratio=self.ideal_ratio,
            ideal_ratio_whole=self.ideal_ratio_whole,
        )
        return out


class _AdapterLike(Protocol):
    config: Any
    mlp_matrices: int

    @property
    def num_layers(self) -> int: ...

    def geometry(self, kind: BlockKind) -> BlockGeometry: ...


@dataclass
class _OpenBatch:
    batch: int
    seq: int
    counts: dict[BlockKind, int] = field(default_factory=lambda: {BlockKind.ATTENTION: 0, BlockKind.MLP: 0})
    layers: dict[BlockKind, set[int]] = field(
        default_factory=lambda: {BlockKind.ATTENTION: set(), BlockKind.MLP: set()}
    )


class FlopsCounter:
    """Accumulates dense, pruned and probe FLOPs batch by batch.

    Use ``begin_batch(B, T)``, one ``add_block`` per block that was pruned (or, equally, per block
    of every layer), then ``end_batch()``; blocks not reported for a batch (skipped layers) count
    at their dense cost. ``add_block`` also opens a batch by itself when none is open, when ``B`` or
    ``T`` differ from the open batch, or when its ``layer`` was already reported for that kind in
    the open batch, so a caller that only calls ``add_block`` (with ``layer``) gets the same counts.
    ``report()`` closes the open batch.

    Args:
        num_layers: decoder layers.
        hidden: model width D.
        attention: the attention block's geometry (query heads, head_dim, key/value heads).
        mlp: the MLP block's geometry (intermediate channels).
        mlp_matrices: weight matrices of the MLP block (3 gated LLaMA, 2 OPT).
        vocab: vocabulary size (LM head output width).
        lm_head_in: LM head input width (defaults to ``hidden``).
        kv_follow_query: whether pruning query heads also drops their key/value heads when
            ``kept_kv_heads_count`` is not given (True for OPT, whose k/v rows are sliced with the
            query heads; False for the LLaMA family, whose k/v stay dense unless group-pruned).
    """

    def __init__(
        self,
        *,
        num_layers: int,
        hidden: int,
        attention: BlockGeometry,
        mlp: BlockGeometry,
        mlp_matrices: int,
        vocab: int,
        lm_head_in: int | None = None,
        kv_follow_query: bool = False,
    ) -> None:
        self.num_layers = num_layers
        self.hidden = hidden
        self.attention = attention
        self.mlp = mlp
        self.mlp_matrices = mlp_matrices
        self.vocab = vocab
        self.lm_head_in = lm_head_in if lm_head_in is not None else hidden
        self.kv_follow_query = kv_follow_query
        self.dense = 0
        self.pruned = 0
        self.probe = 0
        self.lm_head = 0
        self.batches = 0
        self.tokens = 0
        self._open: _OpenBatch | None = None

    @classmethod
    def from_adapter(cls, adapter: _AdapterLike) -> FlopsCounter:
        """A counter for the model behind ``adapter`` (geometries, width, layers, vocabulary)."""
        cfg = adapter.config
        hidden = int(cfg.hidden_size)
        lm_in = getattr(cfg, "word_embed_proj_dim", None) or hidden
        follow = getattr(adapter, "kv_follow_query", None)
        if follow is None:
            follow = getattr(adapter, "family", "") == "opt"
        return cls(
            num_layers=int(adapter.num_layers),
            hidden=hidden,
            attention=adapter.geometry(BlockKind.ATTENTION),
            mlp=adapter.geometry(BlockKind.MLP),
            mlp_matrices=int(adapter.mlp_matrices),
            vocab=int(cfg.vocab_size),
            lm_head_in=int(lm_in),
            kv_follow_query=bool(follow),
        )

    # -- shapes ------------------------------------------------------------------------------

    def block_shape(
        self,
        kind: BlockKind,
        B: int,
        T: int,
        kept_units: Any = None,
        kept_kv_heads_count: Any = None,
    ) -> BlockShape:
        """The shape one block computes with ``kept_units`` (None = dense) on a (B, T) batch.

        ``kept_units`` and ``kept_kv_heads_count`` are counts or index tensors.
        """
        kind = BlockKind(kind)
        if kind is BlockKind.ATTENTION:
            geo = self.attention
            q_heads = geo.units if kept_units is None else _count(kept_units)
            kv_total = geo.num_kv_heads or geo.units
            if kept_kv_heads_count is not None:
                kv_heads = _count(kept_kv_heads_count)
            elif self.kv_follow_query:
                kv_heads = q_heads
            else:
                kv_heads = kv_total
            return BlockShape(
                kind, B, T, self.hidden, q_heads=q_heads, kv_heads=kv_heads, head_dim=geo.unit_width
            )
        channels = self.mlp.units if kept_units is None else _count(kept_units)
        return BlockShape(kind, B, T, self.hidden, channels=channels, mlp_matrices=self.mlp_matrices)

    def dense_block_flops(self, kind: BlockKind, B: int, T: int) -> int:
        """FLOPs of one dense block on a (B, T) batch."""
        return self.block_shape(kind, B, T).flops()

    def dense_decoder_flops(self, B: int, T: int) -> int:
        """FLOPs of all dense decoder layers on a (B, T) batch."""
        attention = self.dense_block_flops(BlockKind.ATTENTION, B, T)
        per_layer = attention + self.dense_block_flops(BlockKind.MLP, B, T)
        return self.num_layers * per_layer

    def lm_head_flops(self, B: int, T: int) -> int:
        """FLOPs of the LM head on a (B, T) batch."""
        return lm_head_flops(B, T, self.lm_head_in, self.vocab)

    def block_probe_flops(self, kind: BlockKind, probe_rows: int, probe_tokens: int) -> int:
        """FLOPs of one block's probe (full weights) on ``probe_rows`` x ``probe_tokens``."""
        return self.block_shape(kind, probe_rows, probe_tokens).probe_flops()

    # -- events ------------------------------------------------------------------------------

    def begin_batch(self, B: int, T: int) -> None:
        """Start counting a (B, T) batch (closing any open one)."""
        self.end_batch()
        self._open = _OpenBatch(B, T)
        self.dense += self.dense_decoder_flops(B, T)
        self.lm_head += self.lm_head_flops(B, T)
        self.batches += 1
        self.tokens += B * T

    def add_block(
        self,
        kind: BlockKind,
        B: int,
        T: int,
        kept_units: Any = None,
        kept_kv_heads_count: Any = None,
        probe_rows: int = 0,
        probe_tokens: int = 0,
        *,
        layer: int | None = None,
    ) -> BlockShape:
        """Record one block of the open batch and return the shape that was counted.

        ``kept_units`` (a count or the kept index tensor; None = dense) are query heads or MLP
        channels; ``kept_kv_heads_count`` the computed key/value heads (None = the family's default,
        see the class). ``probe_rows`` x ``probe_tokens`` is the probe size (0 = no probe).
        """
        kind = BlockKind(kind)
        current = self._open
        if (
            current is None
            or (current.batch, current.seq) != (B, T)
            or (layer is not None and layer in current.layers[kind])
        ):
            self.begin_batch(B, T)
            current = self._open
        assert current is not None
        if current.counts[kind] >= self.num_layers:
            raise ValueError(
                f"add_block: more than {self.num_layers} {kind.value} blocks reported for one batch; "
                "call begin_batch() for each batch or pass layer="
            )
        current.counts[kind] += 1
        if layer is not None:
            current.layers[kind].add(layer)
        shape = self.block_shape(kind, B, T, kept_units, kept_kv_heads_count)
        self.pruned += shape.flops()
        self.probe += self.block_probe_flops(kind, probe_rows, probe_tokens)
        return shape

    def end_batch(self) -> None:
        """Close the open batch: blocks not reported for it count at their dense cost."""
        current = self._open
        if current is None:
            return
        for kind, count in current.counts.items():
            missing = self.num_layers - count
            self.pruned += missing * self.dense_block_flops(kind, current.batch, current.seq)
        self._open = None

    def add_dense_batch(self, B: int, T: int) -> None:
        """Count a batch that ran entirely dense."""
        self.begin_batch(B, T)
        self.end_batch()

    def report(self) -> FlopsReport:
        """The totals so far (closes the open batch)."""
        self.end_batch()
        return FlopsReport(
            dense=self.dense,
            pruned=self.pruned,
            probe=self.probe,
            lm_head=self.lm_head,
            batches=self.batches,
            tokens=self.tokens,
        )

    def reset(self) -> None:
        """Forget every counted batch."""
        self.dense = self.pruned = self.probe = self.lm_head = 0
        self.batches = self.tokens = 0
        self._open = None


def dense_forward_flops(adapter: _AdapterLike, B: int, T: int) -> int:
    """FLOPs of one dense forward of the whole model on a (B, T) batch: decoder layers + LM head.

    The embedding lookup (and OPT's optional in/out projections) are ignored.
    """
    counter = FlopsCounter.from_adapter(adapter)
    return counter.dense_decoder_flops(B, T) + counter.lm_head_flops(B, T)
