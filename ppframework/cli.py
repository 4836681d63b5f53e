"""The ``ppf`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from ppframework.errors import ConfigError


def _out_lock(out_dir: str | None) -> AbstractContextManager[Any]:
    """Check ``--out`` now and hold its lock while the command runs (nothing when unset)."""
    from ppframework.outputs import check_out_dir, hold_out_dir

    if not out_dir:
        return nullcontext()
    check_out_dir(out_dir, "--out")
    return hold_out_dir(out_dir, "--out")


def _check_common_args(args: argparse.Namespace) -> None:
    """Refuse values of ``--out`` and ``--limit`` that would otherwise be dropped or blamed on a config
    field: an empty ``--out`` (no results would be written) and a ``--limit`` below 1."""
    out = getattr(args, "out", None)
    if out is not None and not out.strip():
        raise ConfigError("--out: is empty, so no results would be written; give a folder or drop --out")
    limit = getattr(args, "limit", None)
    if limit is not None and limit < 1:
        raise ConfigError(
            f"--limit: must be a whole number >= 1, got {limit}; drop --limit to use every item"
        )


def _write_results(write: Callable[[], Path], out_dir: str) -> Path | None:
    """Write the results (already printed); on failure say so and return None."""
    try:
        return write()
    except OSError as exc:
        print(
            f"error: could not write the results into {out_dir!r} ({exc}); the table above holds them",
            file=sys.stderr,
        )
        return None


def _exit_status(report: Any, wrote: bool) -> int:
    """0, or 1 when a method failed or the results could not be written."""
    failures = getattr(report, "failures", [])
    if failures:
        names = ", ".join(row.method for row in failures)
        print(
            f"error: {len(failures)} method(s) failed: {names}; the other results were kept", file=sys.stderr
        )
    return 1 if failures or not wrote else 0


def _apply_common_options(cfg: Any, args: argparse.Namespace) -> None:
    """``--out`` and ``--no-progress`` over the file's ``out_dir`` and ``progress``."""
    if args.out:
        cfg.out_dir = args.out
    if args.no_progress:
        cfg.progress = False


def _save(write: Callable[[], Path], cfg: Any, also_written: str | Callable[[], str]) -> Path | None:
    """Run ``write`` when the config has an ``out_dir`` and say what it wrote (``also_written``: the
    other files, or a function saying so after the write); None: nothing written."""
    path = _write_results(write, cfg.out_dir) if cfg.out_dir else None
    if path:
        print(f"\nwrote {path}{also_written() if callable(also_written) else also_written}")
    return path


def _finish(report: Any, cfg: Any, path: Path | None) -> int:
    """Print the total time; the exit status (:func:`_exit_status`)."""
    print(f"total time {report.elapsed_s:.1f} s")
    return _exit_status(report, wrote=path is not None or not cfg.out_dir)


def _cmd_run(args: argparse.Namespace) -> int:
    from ppframework.api import load_config
    from ppframework.runner import format_table, run, write_report

    cfg = load_config(args.config, args.set)
    _apply_common_options(cfg, args)
    if "evaluation" in cfg.model_fields_set:
        print(
            "note: the `evaluation` section is used by `ppf eval`; `ppf run` measures perplexity only",
            file=sys.stderr,
        )
    with _out_lock(cfg.out_dir):
        report = run(cfg)
        print(format_table(report))
        path = _save(lambda: write_report(report, cfg.out_dir), cfg, "")
    return _finish(report, cfg, path)


def _cmd_ablate(args: argparse.Namespace) -> int:
    from ppframework.ablation import load_ablation
    from ppframework.runner import format_table, run, write_report
    from ppframework.runner.points import PointStore

    if args.launcher != "ray" and args.address:
        raise ConfigError("--address: only used with --launcher ray; add --launcher ray or drop --address")
    if args.launcher == "ray":
        from ppframework.sweep.ray_launcher import import_ray

        import_ray()  # says how to install Ray before any work
    plan = load_ablation(args.config, args.set)
    cfg = plan.run
    _apply_common_options(cfg, args)
    if args.rerun and not cfg.out_dir:
        raise ConfigError("--rerun: finished points are only kept (and reused) with --out; add --out DIR")
    if plan.resources is not None and args.launcher == "local":
        print(
            "note: `resources` applies to --launcher ray; the local launcher runs in this process",
            file=sys.stderr,
        )
    ablation = {
        "description": plan.description,
        "points": [{"variant": p.variant, "grid": p.grid, "label": p.method.label} for p in plan.points],
    }
    store = PointStore.in_out_dir(cfg.out_dir) if cfg.out_dir else None
    if store is not None:
        store.check_folder()
    with _out_lock(cfg.out_dir):
        print(f"ablation: {len(plan.points)} method(s) + dense; {plan.description}".rstrip("; "))
        if args.launcher == "ray":
            from ppframework.sweep.ray_launcher import run_ray

            report = run_ray(
                cfg,
                resources=plan.resources,
                address=args.address,
                store=store,
                rerun=args.rerun,
                method_fields=plan.method_fields,
                extra_settings={"ablation": ablation},
            )
        else:
            report = run(
                cfg,
                method_fields=plan.method_fields,
                extra_settings={"ablation": ablation},
                store=store,
                rerun=args.rerun,
            )
        print(format_table(report))
        resumed = (report.sweep or {}).get("resumed") or []
        if resumed:
            print(
                f"\nreused {len(resumed)} finished point(s) from {store.folder if store else '-'} "
                f"({', '.join(resumed)}); --rerun runs them again"
            )
        path = _save(lambda: write_report(report, cfg.out_dir), cfg, " (+ results.csv, results.md)")
    return _finish(report, cfg, path)


def _cmd_eval(args: argparse.Namespace) -> int:
    from ppframework.api import load_config
    from ppframework.evaluate import evaluate, format_eval_table, write_eval_report

    overrides = list(args.set)
    if args.limit is not None:
        overrides.append(f"evaluation.zeroshot.limit={args.limit}")
        overrides.append(f"evaluation.generation.limit={args.limit}")
        overrides.append(f"evaluation.lm_eval.limit={args.limit}")
    cfg = load_config(args.config, overrides)
    _apply_common_options(cfg, args)
    with _out_lock(cfg.out_dir):
        report = evaluate(cfg)
        print(format_eval_table(report))
        path = _save(
            lambda: write_eval_report(report, cfg.out_dir),
            cfg,
            lambda: f" (+ results.csv, results.md{', plots' if report.plots else ''})",  # set by the write
        )
    return _finish(report, cfg, path)


def _cmd_generate(args: argparse.Namespace) -> int:
    from ppframework.api import load_config
    from ppframework.generation.compare import check_prompts, compare_generation, format_generate_table
    from ppframework.outputs import atomic_write_text, write_json

    check_prompts(args.prompt, args.max_new_tokens)
    cfg = load_config(args.config, args.set)
    _apply_common_options(cfg, args)
    with _out_lock(cfg.out_dir):
        report = compare_generation(cfg, args.prompt, args.max_new_tokens)
        table = format_generate_table(report)
        print(table)

        def write() -> Path:
            out = Path(cfg.out_dir)
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "results.md", table + "\n")
            return write_json(out / "results.json", report.to_json())

        path = _save(write, cfg, " (+ results.md)")
    return _finish(report, cfg, path)


def _cmd_export(args: argparse.Namespace) -> int:
    from ppframework.api import build_pipeline, load_config
    from ppframework.export import export_pruned
    from ppframework.export.folder import check_target
    from ppframework.export.model_export import check_static_method
    from ppframework.models import load_model_from_config

    if not args.out:
        raise ConfigError("--out: required; give a new (or empty) folder for the exported model")
    cfg = load_config(args.config, args.set)
    _apply_common_options(cfg, args)
    if not 0 <= args.method < len(cfg.methods):
        raise ConfigError(f"--method: {args.method} is not a method index; the file has {len(cfg.methods)}")
    check_static_method(cfg.methods[args.method], f"methods[{args.method}]")  # before the model loads
    check_target(cfg.out_dir, "--out")
    model, tokenizer = load_model_from_config(cfg.model)
    pipe = build_pipeline(model, cfg, method_index=args.method, tokenizer=tokenizer, progress=cfg.progress)
    result = None

    def write() -> Path:
        nonlocal result
        result = export_pruned(pipe, cfg.out_dir, tokenizer=tokenizer, format=args.format, field_name="--out")
        return result.path

    path = _save(write, cfg, lambda: f" ({result.format} format)" if result else "")
    if result is not None:
        if result.reason:
            print(f"per-layer format because {result.reason}; load it with ppframework.load_pruned(DIR)")
        print(
            f"{pipe.method.label}: {result.parameters:,} of {result.source_parameters:,} parameters, "
            f"{result.bytes / 2**20:.1f} MiB of weights"
        )
    return _finish(result or _Failed(), cfg, path)


class _Failed:
    """The report of an export whose write failed (for :func:`_finish`)."""

    elapsed_s = 0.0
    failures: list[Any] = []


def _cmd_plugins(args: argparse.Namespace) -> int:
    from ppframework.plugin_listing import format_plugins
    from ppframework.registry import default_registry

    print(format_plugins(default_registry()))
    return 0


def _cmd_strategies(args: argparse.Namespace) -> int:
    from ppframework.hookspecs import STAGES
    from ppframework.registry import default_registry

    registry = default_registry()
    for stage in STAGES:
        print(f"{stage}:")
        for info in registry.all():
            if info.stage == stage:
                print(f"  {info.name:<20} {info.source:<24} {info.description}")
    errors = [p for p in registry.plugins if p.error]
    for report in errors:
        print(f"plugin {report.name} failed to load: {report.error}", file=sys.stderr)
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from ppframework.config import PRESETS

    for name, spec in sorted(PRESETS.items()):
        print(f"{name:<14} {spec.get('description', '')}")
    return 0


def _add_set_option(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a field of the file (YAML value), e.g. --set {example} (repeatable)",
    )


def _add_config_command(
    sub: Any,
    name: str,
    func: Callable[[argparse.Namespace], int],
    *,
    help: str,
    config_help: str,
    set_example: str,
    out_help: str,
) -> argparse.ArgumentParser:
    """A subcommand that reads a config file: ``config``, ``--set``, ``--out`` and ``--no-progress``."""
    parser = sub.add_parser(name, help=help)
    parser.add_argument("config", help=config_help)
    _add_set_option(parser, set_example)
    parser.add_argument("--out", help=out_help)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=func)
    return parser


def _set_threads(threads: int) -> None:
    """Apply ``--threads`` before any work (intra-op threads; results record the count)."""
    if threads < 1:
        raise ConfigError(f"--threads: {threads} is not a thread count; give 1 or more")
    import torch

    torch.set_num_threads(threads)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ppf``."""
    parser = argparse.ArgumentParser(
        prog="ppf", description="Online dynamic structured pruning (Probe Pruning)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads for PyTorch (torch.set_num_threads); 1 steadies timings on a busy machine",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    _add_config_command(
        sub,
        "run",
        _cmd_run,
        help="dense vs each configured method: perplexity, time, realised ratio",
        config_help="YAML or JSON run config",
        set_example="methods.0.pruning.ratio=0.2",
        out_help="directory for results.json and results.md",
    )

    ablate = _add_config_command(
        sub,
        "ablate",
        _cmd_ablate,
        help="run an ablation file: base run + variants (+ grid), one table; finished points are kept "
        "in --out/points and reused when the same file runs again",
        config_help="YAML or JSON ablation file (base, variants, grid)",
        set_example="base.data.max_batches=3",
        out_help="directory for results.json, results.csv and results.md",
    )
    ablate.add_argument(
        "--launcher",
        choices=("local", "ray"),
        default="local",
        help="local: every point in this process (default); ray: points as Ray actor tasks, with the "
        "file's `resources` per worker (needs ppframework[ray])",
    )
    ablate.add_argument(
        "--address",
        metavar="ADDR",
        help="with --launcher ray: the cluster to join (auto, HOST:6379 or ray://HOST:10001); default: "
        "start a local one",
    )
    ablate.add_argument(
        "--rerun",
        action="store_true",
        help="run every point again instead of reusing the finished ones kept in --out/points",
    )

    evaluate = _add_config_command(
        sub,
        "eval",
        _cmd_eval,
        help="the full protocol: perplexity, zero-shot accuracy, interleaved runtime, FLOPs, memory, "
        "PRR, plots",
        config_help="YAML or JSON run config (its `evaluation` section)",
        set_example="evaluation.runtime.repeats=3",
        out_help="directory for results.json/.csv/.md and the PNG plots",
    )
    evaluate.add_argument(
        "--limit", type=int, help="first N items per zero-shot, lm-eval and generation task (quick runs)"
    )

    generate = _add_config_command(
        sub,
        "generate",
        _cmd_generate,
        help="dense and each method complete the prompts with model.generate(): text, tokens, prefill "
        "seconds, decode tokens/s",
        config_help="YAML or JSON run config (model, calibration, methods)",
        set_example="methods.0.decode=dense",
        out_help="directory for results.json and results.md",
    )
    generate.add_argument(
        "--prompt", action="append", default=[], metavar="TEXT", help="text to continue (repeat for a batch)"
    )
    generate.add_argument("--max-new-tokens", type=int, default=64, help="new tokens at most (default 64)")

    export = sub.add_parser(
        "export",
        help="write a static method's pruned model into a new folder: a standard Hugging Face checkpoint "
        "when every layer has the same widths, else the per-layer format (ppframework.load_pruned)",
    )
    export.add_argument("config", help="YAML or JSON run config (model, calibration, methods)")
    _add_set_option(export, "methods.0.pruning.skip_layers=[]")
    export.add_argument("--out", help="new or empty folder for the exported model (required)")
    export.add_argument("--method", type=int, default=0, help="index of the method in `methods` (default 0)")
    export.add_argument(
        "--format",
        choices=("auto", "hf", "per-layer"),
        default="auto",
        help="auto: a standard checkpoint when possible (default); hf: refuse otherwise; per-layer: always",
    )
    export.add_argument("--no-progress", action="store_true", help="hide progress bars")
    export.set_defaults(func=_cmd_export)

    plugins = sub.add_parser("plugins", help="list plugin distributions, their strategies and load errors")
    plugins.set_defaults(func=_cmd_plugins)

    strategies = sub.add_parser("strategies", help="list registered strategies per stage with their source")
    strategies.set_defaults(func=_cmd_strategies)

    presets = sub.add_parser("presets", help="list method presets")
    presets.set_defaults(func=_cmd_presets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ppf``; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.threads is not None:
            _set_threads(args.threads)
        _check_common_args(args)
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "error: interrupted; results of the methods that finished are in --out (if set)", file=sys.stderr
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
