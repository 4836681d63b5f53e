"""The methods the speed benchmark times: presets and ablation variants at a ratio, with the
benchmark's skipped layers and width rounding, and the ``--static`` / ``--variants`` choices."""

from __future__ import annotations

import argparse
from typing import Any

from ppframework.config import MethodConfig


def method(
    preset: str,
    ratio: float,
    skip_layers: list[int],
    round_to: int,
    probe_seq_ratio: float | None = None,
    decode: str | None = None,
    own_shapes: bool = False,
) -> MethodConfig:
    """A preset at ``ratio`` with the benchmark's skipped layers and width rounding (``own_shapes``: the
    preset's own, so the kept shapes are those ``ppf eval`` and ``prompt_conditioned.py`` prune); a
    ``probe_seq_ratio`` replaces the residual probe's fraction of positions (a named, result-changing
    option, never the ``pp`` default); ``decode`` sets the decode policy of ``generate`` (None: the
    preset's, ``frozen``)."""
    pruning: dict[str, Any] = {"ratio": ratio}
    if not own_shapes:
        pruning.update(skip_layers=skip_layers, round_to=round_to)
    data: dict[str, Any] = {"preset": preset, "pruning": pruning}
    if decode is not None:
        data["decode"] = decode
    if probe_seq_ratio is not None:
        data["name"] = f"pp probe-tokens {probe_seq_ratio:g}"
        params = {"seq_ratio": probe_seq_ratio, "batch_ratio": 0.05}
        data["strategies"] = {"select_probe": {"name": "residual", "params": params}}
    return MethodConfig.model_validate(data)


def statics(args: argparse.Namespace) -> list[str]:
    """The static baseline presets of ``--static`` (``none``: no baseline)."""
    return [name for name in args.static if name != "none"]


def ablation_variants(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--variants`` of the ablation file ``--variants-from`` (name -> override), checked."""
    if not args.variants:
        return {}
    if not args.variants_from:
        raise SystemExit("--variants: name the ablation file they come from with --variants-from FILE")
    from ppframework.config import read_config_file

    known = read_config_file(args.variants_from).get("variants") or {}
    missing = [name for name in args.variants if name not in known]
    if missing:
        raise SystemExit(
            f"--variants: {', '.join(missing)} not in {args.variants_from} (it has {', '.join(known)})"
        )
    taken = {"pp", *args.dynamic, *statics(args)} & set(args.variants)
    if taken:
        raise SystemExit(
            f"--variants: {', '.join(sorted(taken))} would share a row label with a variant timed anyway "
            "(pp, --dynamic, --static); leave it out"
        )
    return {name: known[name] for name in args.variants}


def variant(override: Any, ratio: float, skip_layers: list[int], round_to: int) -> MethodConfig:
    """An ablation file's variant on ``pp`` at ``ratio`` with the benchmark's skipped layers and width
    rounding (the ablation's own merge rule, :func:`ppframework.ablation.variant_method`)."""
    from ppframework.ablation import variant_method

    base = {"preset": "pp", "pruning": {"ratio": ratio, "skip_layers": skip_layers, "round_to": round_to}}
    raw = variant_method(base, override)
    raw.setdefault("pruning", {}).update(ratio=ratio, skip_layers=skip_layers, round_to=round_to)
    return MethodConfig.model_validate(raw)
