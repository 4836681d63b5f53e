"""LLM-Pruner-style Taylor importance of every attention head and MLP channel (no LoRA recovery).

One gradient pass of the language-modelling loss over the calibration windows gives, for every weight
``w`` that pruning a unit removes, the mean gradient ``G = dL/dw`` and the mean squared per-batch
gradient ``F`` (the diagonal Fisher, LLM-Pruner's second-order estimate). A weight's salience is the
change of the loss when it is set to zero, to first or second order:

- ``first``: ``s = w * G``; ``second``: ``s = w^2 * F / 2``; ``mix``: ``s = w * G - w^2 * F / 2``.

A unit's *coupled* weights are those its removal deletes: a query head's rows of ``q_proj`` and
columns of ``o_proj`` (with multi-head attention also its ``k_proj``/``v_proj`` rows; under grouped
query attention key/value heads stay dense and are not counted); an MLP channel's rows of
``gate_proj``/``up_proj`` (OPT: ``fc1``) and column of ``down_proj`` (``fc2``). Two reductions:

- ``element`` (LLM-Pruner's element-wise ``param_*``): the sum over the coupled weights of ``|s|``;
- ``vector`` (LLM-Pruner's ``vectorize``): ``|sum of s|`` over the unit's coupled weights. For a head
  the unit is the whole head: each of its channels holds ``|sum over the head| / head_dim``, so the
  head's sum (``head_reduce: sum``) is the head's group score.

Every variant is computed in the one pass (:data:`VARIANTS`) and stored per channel of the output
projection's input, as a (C,) statistic named :func:`statistic_name` (the history's
``channel_stats``). Memory: the model's own activations for one calibration batch, plus ``G`` and
``F`` in fp32 for the coupled projection weights only (no other parameter keeps a gradient; each
``.grad`` is folded into the sums and freed as soon as autograd has accumulated it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ppframework.adapters import ModelAdapter
from ppframework.devices import input_device
from ppframework.strategies.taylor import statistic_name
from ppframework.types import BlockKind

logger = logging.getLogger(__package__)

ORDERS: tuple[str, ...] = ("first", "second", "mix")
REDUCTIONS: tuple[str, ...] = ("element", "vector")
VARIANTS: tuple[tuple[str, str], ...] = tuple((o, r) for o in ORDERS for r in REDUCTIONS)

_INPUT_SIDE = {
    BlockKind.ATTENTION: ("q_proj",),
    BlockKind.MLP: ("gate_proj", "up_proj", "fc1"),
}
_KV = ("k_proj", "v_proj")


def coupled_weights(adapter: ModelAdapter, layer: int, kind: BlockKind) -> list[tuple[nn.Parameter, int]]:
    """The weights pruning a unit of block ``(layer, kind)`` removes, each with the axis its channels
    run along: 0 for an input-side projection (row ``c`` is channel ``c``), 1 for the output projection
    (column ``c``).

    Raises ValueError for a family whose projections are fused (Phi-3's ``qkv_proj``/``gate_up_proj``).
    """
    runner = adapter.runner(layer, kind)
    if kind is BlockKind.ATTENTION:
        owner = getattr(runner, "attn", None)
    else:  # the MLP module (OPT: the decoder layer holds fc1/fc2)
        owner = getattr(runner, "mlp", None) or getattr(runner, "layer", None)
    names = list(_INPUT_SIDE[kind])
    geo = runner.geometry
    if kind is BlockKind.ATTENTION and geo.num_kv_heads in (0, geo.units):  # multi-head: k/v follow
        names += list(_KV)
    found = [(getattr(owner, n).weight, 0) for n in names if isinstance(getattr(owner, n, None), nn.Linear)]
    if not found:
        raise ValueError(
            f"Taylor importance needs separate input projections ({', '.join(names)}) in layer {layer}'s "
            f"{kind.value} block; the {adapter.family} family fuses them, which the 'taylor' metric does not "
            "support (use another score_channels strategy for this model)"
        )
    return [*found, (runner.out_proj.weight, 1)]


def _reduce(values: torch.Tensor, axis: int, absolute: bool) -> torch.Tensor:
    """(C,) per-channel sum of ``values`` (of ``|values|`` when ``absolute``) along the channel axis."""
    values = values.abs() if absolute else values
    return values.sum(dim=1 - axis)


def channel_saliences(
    weights: list[tuple[torch.Tensor, int]],
    grads: list[torch.Tensor],
    fishers: list[torch.Tensor],
    head_dim: int = 1,
) -> dict[str, torch.Tensor]:
    """Every variant's (C,) score of one block from its coupled weights, mean gradients ``grads`` and
    mean squared gradients ``fishers`` (same order; fp32). ``head_dim`` > 1 (attention) makes the
    ``vector`` reduction one group per head, spread evenly over the head's channels."""
    out: dict[str, torch.Tensor] = {}
    for order in ORDERS:
        element: torch.Tensor | None = None
        signed: torch.Tensor | None = None
        for (weight, axis), grad, fisher in zip(weights, grads, fishers, strict=True):
            w = weight.detach().float()
            first = w * grad
            half_curvature = 0.5 * w.square() * fisher
            s = first if order == "first" else half_curvature if order == "second" else first - half_curvature
            e, v = _reduce(s, axis, True), _reduce(s, axis, False)
            element = e if element is None else element + e
            signed = v if signed is None else signed + v
        assert element is not None and signed is not None
        if head_dim > 1:
            per_head = signed.view(-1, head_dim).sum(dim=1).abs() / head_dim
            vector = per_head.repeat_interleave(head_dim)
        else:
            vector = signed.abs()
        out[statistic_name(order, "element")] = element
        out[statistic_name(order, "vector")] = vector
    return out


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean ``cross_entropy(logits[:, :-1], ids[:, 1:])``, in fp32 at least (fp64 stays fp64)."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


class _GradientSums:
    """``G`` and ``F`` of one parameter, filled by a post-accumulate-grad hook that frees ``.grad``."""

    def __init__(self, param: nn.Parameter) -> None:
        self.grad = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
        self.fisher = torch.zeros_like(self.grad)

    def __call__(self, param: torch.Tensor) -> None:
        g = param.grad.detach().float()  # type: ignore[union-attr]
        self.grad.add_(g)
        self.fisher.addcmul_(g, g)
        param.grad = None


def _iter_unique(params: Iterator[nn.Parameter]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for p in params:
        seen.setdefault(id(p), p)
    return list(seen.values())


def gradient_moments(
    model: nn.Module, params: list[nn.Parameter], batches: list[torch.Tensor], progress: bool = True
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``(G, F)`` of every parameter in ``params`` (keyed by ``id``; fp32): the mean over ``batches`` of
    each batch's gradient of the mean next-token loss (:func:`next_token_loss`) and of its square.

    One backward per batch; only ``params`` require gradients meanwhile and each ``.grad`` is folded
    into the sums and freed as autograd accumulates it. The model's ``requires_grad`` flags and
    train/eval mode are restored afterwards; dropout stays off (eval).
    """
    if not batches:
        raise ValueError("the Taylor gradient pass needs at least one calibration batch")
    params = _iter_unique(iter(params))
    flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    sums = {id(p): _GradientSums(p) for p in params}
    handles = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
            handles.append(p.register_post_accumulate_grad_hook(sums[id(p)]))
        model.eval()
        device = input_device(model)
        with torch.enable_grad():
            for batch in tqdm(batches, desc="taylor gradients", unit="batch", disable=not progress):
                ids = batch.to(device)
                next_token_loss(model(input_ids=ids, use_cache=False).logits, ids).backward()
    finally:
        for handle in handles:
            handle.remove()
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), p.requires_grad))
            p.grad = None
        model.train(was_training)
    n = float(len(batches))
    return {key: (s.grad / n, s.fisher / n) for key, s in sums.items()}


def taylor_statistics(
    model: nn.Module,
    adapter: ModelAdapter,
    batches: list[torch.Tensor],
    layers: list[int] | None = None,
    progress: bool = True,
) -> dict[tuple[int, BlockKind], dict[str, torch.Tensor]]:
    """Every block's (C,) Taylor statistics by variant (:data:`VARIANTS`), fp32 on the layer's device,
    from :func:`gradient_moments` of its coupled weights over ``batches``."""
    layers = list(range(adapter.num_layers)) if layers is None else layers
    coupled = {(i, kind): coupled_weights(adapter, i, kind) for i in layers for kind in BlockKind}
    moments = gradient_moments(model, [p for pairs in coupled.values() for p, _ in pairs], batches, progress)
    out: dict[tuple[int, BlockKind], dict[str, torch.Tensor]] = {}
    for (layer, kind), pairs in coupled.items():
        grads = [moments[id(p)][0] for p, _ in pairs]
        fishers = [moments[id(p)][1] for p, _ in pairs]
        head_dim = adapter.geometry(kind).unit_width if kind is BlockKind.ATTENTION else 1
        out[(layer, kind)] = channel_saliences(pairs, grads, fishers, head_dim)  # type: ignore[arg-type]
    return out
