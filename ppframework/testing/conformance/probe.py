"""The ``select_probe`` check: which rows and positions a probe may choose."""

from __future__ import annotations

from typing import Any

import torch

from ppframework.testing.conformance.examples import _run_stage, _strategies
from ppframework.testing.conformance.fixtures import make_context
from ppframework.testing.conformance.inputs import _SEED, PADDINGS, _padding_mask
from ppframework.testing.conformance.subject import _Subject
from ppframework.testing.conformance.values import _fmt, _snapshot
from ppframework.types import BlockContext, BlockKind, Probe
from ppframework.validation import check_probe


def _draw_probe_case(data: Any) -> dict[str, Any]:
    st = _strategies()
    return {
        "batch": data.draw(st.integers(1, 6), label="batch"),
        "seq": data.draw(st.integers(1, 16), label="seq_len"),
        "dim": data.draw(st.integers(1, 12), label="dim"),
        "padding": data.draw(st.sampled_from(PADDINGS), label="padding"),
        "values": data.draw(st.sampled_from(("random", "constant")), label="values"),
        "dtype": data.draw(st.sampled_from((torch.float32, torch.bfloat16)), label="dtype"),
        "kind": data.draw(st.sampled_from(tuple(BlockKind)), label="kind"),
        "batch_index": data.draw(st.integers(0, 3), label="batch_index"),
        "seed": data.draw(st.integers(0, _SEED), label="seed"),
    }


_PROBE_CORNERS: tuple[dict[str, Any], ...] = tuple(
    {
        "batch": batch,
        "seq": seq,
        "dim": 8,
        "padding": padding,
        "values": values,
        "dtype": dtype,
        "kind": kind,
        "batch_index": batch_index,
        "seed": 0,
    }
    for batch, seq, padding, values, dtype, kind, batch_index in (
        (1, 1, "none", "random", torch.float32, BlockKind.ATTENTION, 0),
        (1, 12, "right-short", "random", torch.float32, BlockKind.MLP, 1),
        (4, 12, "right-short", "random", torch.float32, BlockKind.ATTENTION, 0),
        (4, 12, "left-short", "random", torch.bfloat16, BlockKind.MLP, 2),
        (3, 16, "right", "constant", torch.float32, BlockKind.ATTENTION, 1),
        (6, 2, "left", "random", torch.bfloat16, BlockKind.ATTENTION, 0),
        (16, 16, "none", "random", torch.float32, BlockKind.MLP, 3),
    )
)


def _probe_case(
    subject: _Subject,
    *,
    batch: int,
    seq: int,
    dim: int,
    padding: str,
    values: str,
    dtype: torch.dtype,
    kind: BlockKind,
    batch_index: int,
    seed: int,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    mask = _padding_mask(gen, batch, seq, padding)
    real = mask.bool()
    if values == "constant":
        residual = torch.ones(batch, seq, dim)
    else:
        residual = torch.randn(batch, seq, dim, generator=gen)
        garbage = 30.0 * torch.randn(batch, seq, dim, generator=gen)  # padding: large, so leaks show
        residual = torch.where(real[..., None], residual, garbage)
    normed = residual * torch.rsqrt(residual.square().mean(dim=-1, keepdim=True) + 1e-6)
    inputs = {"residual": residual.to(dtype), "normed": normed.to(dtype), "attention_mask": mask}
    before = _snapshot(inputs)

    def ctx() -> BlockContext:
        return make_context(kind, batch_index=batch_index, seed=seed, position_valid=real.any(dim=0))

    probe = subject.call(ctx=ctx(), **inputs)
    subject.require_unchanged(before, inputs, "inputs are not modified")
    again = subject.call(ctx=ctx(), **_snapshot(before))
    if probe is None:
        subject.require(again is None, "deterministic: same inputs and seed give the same probe")
        return
    subject.require(isinstance(probe, Probe), "returns a Probe or None", lambda: f"got {probe!r}")
    rows = subject.require_index(probe.batch_index, batch, "batch_index")
    tokens = subject.require_index(probe.token_index, seq, "token_index")
    subject.require(
        rows.numel() >= 1 and tokens.numel() >= 1,
        "the probe is non-empty",
        lambda: f"batch_index={_fmt(rows)}, token_index={_fmt(tokens)}",
    )
    expected = real[rows][:, tokens]
    valid = probe.valid
    subject.require(
        isinstance(valid, torch.Tensor)
        and valid.dtype == torch.bool
        and tuple(valid.shape) == tuple(expected.shape),
        "valid is a bool (k_B, k_T) tensor",
        lambda: f"valid = {_fmt(valid)}, expected shape {tuple(expected.shape)}",
    )
    subject.require(
        torch.equal(valid.detach().cpu(), expected),
        "valid == attention_mask.bool()[batch_index][:, token_index]",
        lambda: f"valid = {_fmt(valid)}, expected {_fmt(expected)}",
    )
    subject.require(
        bool(real.any(dim=0)[tokens].all()),
        "never chooses a position that is padding in every row",
        lambda: f"token_index={_fmt(tokens)}, attention_mask={_fmt(mask)}",
    )
    subject.require(
        bool(real.any(dim=1)[rows].all()),
        "never chooses an all-padding row",
        lambda: f"batch_index={_fmt(rows)}, attention_mask={_fmt(mask)}",
    )
    subject.require_accepted(check_probe, probe, ctx(), batch, seq)
    subject.require_repeated(
        again,
        probe,
        Probe,
        ("batch_index", "token_index", "valid"),
        "deterministic: same inputs and seed give the same probe",
        lambda: f"first {probe!r}, then {again!r}",
    )


def check_select_probe(strategy: Any, *, max_examples: int = 20) -> None:
    """Check a ``select_probe`` strategy against the hook contract.

    Inputs: residual/normed (B, T, D) float32 or bfloat16 (padding entries are large garbage),
    attention masks without padding and with right or left padding, including batches where
    some positions are padding in every row (every row has a real token). Asserts: the result is
    None or a :class:`~ppframework.types.Probe` whose ``batch_index``/``token_index`` are non-empty
    1-D ``torch.long``, strictly ascending and in range; ``valid`` is the bool
    ``attention_mask.bool()[rows][:, tokens]``; no chosen position is padding in every row and no
    chosen row is all padding; the inputs are not modified; the same inputs and generator seed
    give the same probe.
    """
    _run_stage(strategy, "select_probe", _probe_case, _draw_probe_case, max_examples, _PROBE_CORNERS)
