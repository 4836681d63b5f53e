"""What the probe's reuse saves, block by block: one pruned layer's runners of the offline SmolLM2,
with and without the probe's exact values, interleaved in one process.

``speed.py``'s "net of reuse" figure values the FLOPs the full pass reuses at the dense decoder's
average speed; end to end the saving is below this machine's noise. This script times the full pass
of one layer's attention and MLP blocks (kept units from the static baseline at the given ratio,
the probe of ``pp``'s shape: one row in twenty, at least one, and half the positions) with the
probe's values reused and recomputed, checks that both give the same output bit for bit, and scales
the per-block saving to the whole decoder (every pruned layer has the same shapes).

    python benchmarks/block_reuse.py --batch 8 --seq 512 --ratio 0.4 --out DIR
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speedbench.methods import method  # noqa: E402
from speedbench.output import write_report  # noqa: E402
from speedbench.stats import paired_difference  # noqa: E402
from speedbench.workloads import build_model  # noqa: E402

from ppframework.adapters import get_adapter  # noqa: E402
from ppframework.calibration import calibrate  # noqa: E402
from ppframework.metrics.runtime import time_interleaved  # noqa: E402
from ppframework.pipeline import Pipeline  # noqa: E402
from ppframework.types import BlockKind  # noqa: E402


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time each block kind's full pass with and without reuse; returns the JSON report."""
    if args.threads:
        torch.set_num_threads(args.threads)
    args.workload, args.dtype = "smollm2", "float32"
    model, _ = build_model(args, torch.device("cpu"), torch.float32)
    adapter = get_adapter(model)
    gen = torch.Generator().manual_seed(args.seed)
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen)
    history = calibrate(model, adapter, [ids], progress=False)
    skip = [0, 1, 2]
    static = Pipeline(model, method("wanda-sp", args.ratio, skip, 8), history=history)
    layer = static.pruned_layers[len(static.pruned_layers) // 2]
    x = torch.randn(args.batch, args.seq, int(model.config.hidden_size), generator=gen)
    rotary = model.model.rotary_emb(x, torch.arange(args.seq)[None])  # SmolLM2's (cos, sin)
    rows = torch.tensor([args.batch // 2])  # pp's probe: ceil(0.05 * batch) rows, here one
    tokens = torch.randperm(args.seq, generator=gen)[: max(math.ceil(0.5 * args.seq), 2)].sort().values
    blocks = {}
    with torch.inference_mode():
        with static:  # attaching decides the static masks
            pass
        backbone = model.model  # the dense decoder layers, without the LM head
        dense = time_interleaved({"dense": lambda: backbone(input_ids=ids, use_cache=False)}, args.repeats, 0)
        dense_s = dense["dense"].median
        for kind in BlockKind:
            runner, mask = static._runners[(layer, kind)], static._static_masks[(layer, kind)]
            runner.unpin_weights()  # gather per call into the shared buffers, as pp does
            rot = rotary if kind is BlockKind.ATTENTION else None
            _, reuse = runner.probe_forward(
                x, rows, tokens, attention_mask=None, rotary=rot, keep_for_reuse=True
            )

            def full_pass(with_reuse: bool, runner=runner, mask=mask, rot=rot, reuse=reuse) -> torch.Tensor:
                return runner.pre_output(
                    x,
                    attention_mask=None,
                    rotary=rot,
                    kept_units=mask.kept_units,
                    kept_kv_heads=mask.kept_kv_heads,
                    reuse=reuse if with_reuse else None,
                )

            timed = time_interleaved(
                {"recomputed": lambda f=full_pass: f(False), "reused": lambda f=full_pass: f(True)},
                repeats=args.calls,
                warmup=0,
            )
            reused, recomputed = timed["reused"], timed["recomputed"]
            saved = paired_difference(recomputed.seconds, reused.seconds, 1e-3)  # in ms
            pruned = len(static.pruned_layers)
            blocks[kind.value] = {
                "reused_ms": reused.median * 1e3,
                "recomputed_ms": recomputed.median * 1e3,
                "saved_ms": {key: saved[key] for key in ("median", "q25", "q75")},
                "saved_share_of_dense_decoder": saved["median"] / 1e3 * pruned / dense_s,
                "identical": torch.equal(full_pass(True), full_pass(False)),
            }
    return {
        "settings": {
            "batch": args.batch,
            "seq": args.seq,
            "ratio": args.ratio,
            "layer": layer,
            "pruned_layers": len(static.pruned_layers),
            "calls": args.calls,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "dense_decoder_s": dense_s,
        "blocks": blocks,
        "saved_share_of_dense_decoder": sum(b["saved_share_of_dense_decoder"] for b in blocks.values()),
    }


def to_markdown(report: dict[str, Any]) -> str:
    """The report as a table."""
    s = report["settings"]
    lines = [
        "# The probe's reuse, block by block: SmolLM2-135M, CPU fp32",
        "",
        f"batch {s['batch']} x {s['seq']}, ratio {s['ratio']:.0%} (wanda-sp's kept units), "
        f"layer {s['layer']}, "
        f"{s['calls']} interleaved calls each, {s['threads']} thread(s), torch {s['torch']}; dense decoder "
        f"(backbone) {report['dense_decoder_s']:.3f} s.",
        "",
        "| block | full pass, reused (ms) | recomputed (ms) | saved per block (median, quartiles) "
        f"| x {s['pruned_layers']} layers / dense decoder | same output |",
        "|---|---|---|---|---|---|",
    ]
    for kind, b in report["blocks"].items():
        saved = b["saved_ms"]
        lines.append(
            f"| {kind} | {b['reused_ms']:.2f} | {b['recomputed_ms']:.2f} | {saved['median']:.2f} "
            f"({saved['q25']:.2f} .. {saved['q75']:.2f}) | {b['saved_share_of_dense_decoder']:.2%} "
            f"| {'yes' if b['identical'] else 'NO'} |"
        )
    lines += ["", f"Reuse saves {report['saved_share_of_dense_decoder']:.2%} of the dense decoder time."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--calls", type=int, default=30, help="interleaved calls of each form")
    parser.add_argument("--repeats", type=int, default=3, help="dense forwards for the scale")
    parser.add_argument("--layers", type=int, default=None, help="keep only this many decoder layers")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    report = run(args)
    write_report(Path(args.out), "block_reuse", report, to_markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
