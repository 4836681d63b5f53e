"""The markdown of ``ppf eval``'s results: settings paragraph, main table, per-task tables and notes.

:func:`format_eval_table` is results.md (and what the CLI prints); the lm-evaluation-harness, generation
and fidelity tables and the noise note are its parts.
"""

from __future__ import annotations

from typing import Any

from ppframework.evaluate.frontier import format_frontier
from ppframework.evaluate.report import EvalReport
from ppframework.evaluate.rows import EvalRow
from ppframework.formatting import format_number as _fmt
from ppframework.generation.fidelity_eval import mean_top1
from ppframework.metrics.memory import format_bytes
from ppframework.metrics.noise import NOISE_ADVICE
from ppframework.runner import warmup_phrase, window_bos_phrase


def _ratios(
    ratios: dict[str, float], row: EvalRow | None = None, by_label: dict[str, EvalRow] | None = None
) -> str:
    """``vs <baseline>: <PRR ratio>`` cells; a comparison built on an unresolved runtime (the row's or
    the baseline's) reads ``noise``, one where the method is not faster ``not faster``."""
    by_label = by_label or {}
    cells = []
    for name, value in ratios.items():
        base = by_label.get(name)
        if row is not None and (row.runtime_unresolved or (base is not None and base.runtime_unresolved)):
            cells.append(f"vs {name}: {_NOISE_MARK} noise")
        elif row is not None and row.time_ratio is not None and row.time_ratio >= 1.0:
            cells.append(f"vs {name}: not faster")
        else:
            cells.append(f"vs {name}: {_fmt(value, '.2f')}")
    return "; ".join(cells) or "-"


_NOISE_MARK = "\u26a0"


def _prr_cell(row: EvalRow, value: float | None) -> str:
    """A PRR, or why there is none: ``noise`` (spread >= the speed-up), ``not faster``."""
    if value is None:
        return "-"
    if row.runtime_unresolved:
        return f"{_NOISE_MARK} noise"
    if row.time_ratio is not None and row.time_ratio >= 1.0:
        return "not faster"
    return _fmt(value)


def _time_cell(row: EvalRow) -> str:
    """``ratio (IQR)``, flagged when unresolved; ``-`` when the runtime was not measured."""
    if row.time_ratio is None:
        return "-"
    cell = f"{row.time_ratio:.3f} ({_fmt(row.time_ratio_spread)})"
    return cell + f" {_NOISE_MARK}" if row.runtime_unresolved else cell


def noise_note(rows: list[EvalRow]) -> list[str]:
    """Markdown lines naming every row whose runtime comparison is unresolved, with advice."""
    flagged = [r for r in rows if r.runtime_unresolved]
    if not flagged:
        return []
    items = "; ".join(
        f"{r.method}: time ratio {r.time_ratio:.3f}, IQR {r.time_ratio_spread:.3f} vs a difference of "
        f"{abs(1.0 - r.time_ratio):.3f} from dense"
        for r in flagged
    )
    return ["", f"{_NOISE_MARK} unresolved runtime ({items}): {NOISE_ADVICE}. Their PRR and PRR ratios are "
            "withheld here (results.json keeps the raw values with runtime_unresolved = true)."]


def settings_block(report: EvalReport) -> str:
    """One paragraph with every setting the figures depend on."""
    s = report.settings
    r, d, c, ev = s["resolved"], s["data"], s["calibration"], s["evaluation"]
    zs, rt = ev["zeroshot"], ev["runtime"]
    parts = [
        f"model {s['model']['name']} ({r['dtype']}, {r['device']})",
        f"perplexity: {d['name']}/{d['split']}, seq_len {d['seq_len']}, batch {d['batch_size']}, "
        f"{d['window_policy']} windows{window_bos_phrase(d)}, {r['scored_batches']} scored batch(es) after "
        f"{warmup_phrase(d)}",
        f"calibration {c['dataset']} x {c['n_samples']} windows",
        f"seed {s['seed']}",
    ]
    if zs["enabled"]:
        limit = f"first {zs['limit']} items per task" if zs["limit"] else "all items"
        max_len = r.get("zeroshot_max_length")
        parts.append(
            f"zero-shot: {len(zs['tasks'])} tasks, {limit}, batch {zs['batch_size']}, item order, "
            f"inputs up to {max_len if max_len else 'any number of'} tokens"
        )
    le, le_run = ev.get("lm_eval", {}), r.get("lm_eval")
    if le.get("enabled") and le_run:
        limit = f"first {le['limit']} docs per task" if le["limit"] else "all docs"
        shots = "task default" if le["num_fewshot"] is None else le["num_fewshot"]
        parts.append(
            f"lm-eval {le_run['version']}: {len(le['tasks'])} tasks ({len(le_run['local_tasks'])} from local "
            f"files), {limit}, few-shot {shots}, batch {le['batch_size']} over the length-sorted requests of "
            f"all tasks, inputs up to {le_run['max_length']} tokens"
        )
    if rt["enabled"]:
        parts.append(
            f"runtime: {rt['repeats']} interleaved dense/method pairs after {rt['warmup']} warm-up, "
            f"on one {d['batch_size']} x {d['seq_len']} batch"
        )
    return "; ".join(parts)


def _realised_cell(row: EvalRow) -> str:
    """``decoder / model`` realised ratios; "dense prefill" for a method whose decision forwards run
    unpruned (its perplexity windows are prompts: 0 removed by construction; see the decode column of
    the generation and fidelity tables)."""
    if row.dense_prefill and not row.realised_ratio:
        return "dense prefill"
    return f"{_fmt(row.realised_ratio)} / {_fmt(row.realised_ratio_model)}"


def format_eval_table(report: EvalReport) -> str:
    """The results as markdown: main table, per-task accuracy, notes."""
    lines = [
        settings_block(report),
        "",
        "| method | ratio | realised (decoder / model) | perplexity | mean acc | mean acc_norm "
        "| time ratio (IQR) | decoder time ratio | FLOPs-ideal ratio | probe FLOPs | tokens/s | peak memory "
        "| PRR | PRR_base / PRR | acc PRR_base / PRR |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_label = {r.method: r for r in report.rows}
    for row in report.rows:
        name = row.method + (" (static)" if row.static else "")
        probe = _fmt(row.flops.get("probe_share"), ".2%") if row.flops else "-"
        lines.append(
            f"| {name} | {row.target_ratio:.2f} "
            f"| {_realised_cell(row)} "
            f"| {_fmt(row.perplexity)} "
            f"| {_fmt(row.mean_acc, '.4f')} | {_fmt(row.mean_acc_norm, '.4f')} "
            f"| {_time_cell(row)} | {_fmt(row.decoder_time_ratio)} "
            f"| {_fmt(row.ideal_time_ratio)} | {probe} | {_fmt(row.tokens_per_s, '.1f')} "
            f"| {format_bytes(row.peak_memory_bytes)} | {_prr_cell(row, row.prr)} "
            f"| {_ratios(row.prr_ratios, row, by_label)} "
            f"| {_ratios(row.accuracy_prr_ratios, row, by_label)} |"
        )
    lines += noise_note(report.rows)
    tasks = list(report.rows[0].accuracy)
    if tasks:
        lines += ["", "| method | " + " | ".join(tasks) + " | mean |", "|---|" + "---|" * (len(tasks) + 1)]
        for row in report.rows:
            cells = [
                f"{row.accuracy[t]['acc']:.4f} / {_fmt(row.accuracy[t]['acc_norm'], '.4f')}" for t in tasks
            ]
            mean = f"{_fmt(row.mean_acc, '.4f')} / {_fmt(row.mean_acc_norm, '.4f')}"
            lines.append(f"| {row.method} | " + " | ".join(cells) + f" | {mean} |")
        lines += [
            "",
            "built-in scorer: cells are acc / acc_norm, as the stock lm-evaluation-harness tasks define them "
            "(acc_norm divides by the choice's length in characters; BoolQ and WinoGrande report acc only, "
            "so mean acc_norm averages the other tasks)."
            + (_HELLASWAG_NOTE if "hellaswag" in tasks else ""),
        ]
    if report.frontier is not None:
        lines += format_frontier(report.frontier)
    lines += lm_eval_table(report)
    lines += generation_table(report)
    lines += fidelity_table(report)
    lines += [
        "",
        "realised = fraction of the decoder's prunable projection weights removed / the same weights as a "
        "fraction of every parameter of the model, embeddings included. "
        "time ratio = median method forward / median dense forward over interleaved pairs on the same batch "
        "(whole model, LM head included); decoder time ratio = the same for the decoder layers alone. "
        "FLOPs-ideal ratio = (pruned + probe + LM head) / dense FLOPs of the whole forward. "
        "PRR = (ppl - ppl_dense) / (1 - time ratio), lower is better; PRR_base / PRR > 1 means the method "
        "loses less quality per unit of runtime saved than that baseline (same target ratio). "
        "peak memory: CUDA max allocated, or the process's peak RSS on CPU (a lifetime high-water mark).",
    ]
    if report.plots:
        lines += ["", "plots: " + ", ".join(report.plots)]
    if not report.complete:
        lines += ["", "(partial results: the evaluation has not finished; PRR and plots come at the end)"]
    return "\n".join(lines)


_HELLASWAG_NOTE = (
    " HellaSwag: the local copy lacks ctx_a/ctx_b/activity_label, so its prompts keep the copy's lower-case "
    "start of ctx_b where the stock task capitalises it; not comparable digit for digit with hub numbers."
)


_LM_EVAL_SCORES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("acc", "acc_norm"), "acc / acc_norm"),
    (("pass@1",), "pass@1"),
    (("rouge1", "rouge2", "rougeL"), "R-1 / R-2 / R-L"),
)
"""Score families of lm-eval tasks: the metrics a cell shows (when the task reports the first) and their
header; other tasks show every metric the harness reports."""


def _lm_eval_scores(metrics: dict[str, Any]) -> tuple[list[str], str]:
    """The metric names of one lm-eval task's cell and their header label."""
    for names, label in _LM_EVAL_SCORES:
        if names[0] in metrics:
            return [n for n in names if n in metrics], label
    other = [k for k in metrics if k != "n_items" and "_stderr" not in k]
    return other, " / ".join(other)


def _lm_eval_header(task: str, rows: list[EvalRow]) -> str:
    """``task`` (acc tasks), or ``task`` and its metrics (``humaneval pass@1``, ``xsum R-1 / R-2 / R-L``)."""
    metrics = next((r.lm_eval[task] for r in rows if r.lm_eval.get(task)), {})
    names, label = _lm_eval_scores(metrics)
    return task if not names or names[0] == "acc" else f"{task} {label}"


def _lm_eval_cell(metrics: dict[str, Any]) -> str:
    names, _ = _lm_eval_scores(metrics)
    if not names:
        return "-"
    cell = " / ".join(_fmt(metrics[n], ".4f") for n in names)
    if names[0] == "pass@1" and "n_items" in metrics:
        cell += f" ({metrics['n_items']})"
    return cell


def lm_eval_table(report: EvalReport) -> list[str]:
    """Markdown lines of the lm-evaluation-harness tasks (none when they did not run).

    Each cell shows the task's score family: acc / acc_norm (acc alone where the task has no acc_norm),
    pass@1 with the number of items (HumanEval, MBPP), ROUGE-1 / 2 / L F1 (XSum), or every metric the
    harness reports for any other task; mean acc averages the tasks that report acc.
    """
    tasks = list(report.rows[0].lm_eval) if report.rows else []
    if not tasks:
        return []
    headers = [_lm_eval_header(t, report.rows) for t in tasks]
    lines = [
        "",
        "| method (lm-eval) | " + " | ".join(headers) + " | mean acc | forwards |",
        "|---|" + "---|" * (len(tasks) + 2),
    ]
    for row in report.rows:
        cells = [_lm_eval_cell(row.lm_eval.get(task, {})) for task in tasks]
        forwards = row.lm_eval_batches.get("forwards", "-")
        mean = _fmt(row.lm_eval_mean_acc, ".4f")
        lines.append(f"| {row.method} | " + " | ".join(cells) + f" | {mean} | {forwards} |")
    le_run = report.settings.get("resolved", {}).get("lm_eval") or {}
    local = sorted(le_run.get("local_tasks", {}))
    generative = [t for t in tasks if t in ("humaneval", "mbpp", "xsum") and t in local]
    lines += [
        "",
        f"lm-evaluation-harness {le_run.get('version', '?')} (HFLM around the live model, pipeline "
        "attached): cells are acc / acc_norm where the task reports acc_norm; mean acc over the tasks that "
        f"report acc. Local-file tasks: {', '.join(local) or 'none'}; the others are stock hub tasks. The "
        "harness batches the length-sorted requests of all tasks together, so a dynamic method decides "
        "on other batches than in the built-in scorer (docs/evaluation.md)."
        + (_HELLASWAG_NOTE if "hellaswag" in local else "")
        + (_LM_EVAL_GENERATION_NOTE if generative else ""),
    ]
    return lines


_LM_EVAL_GENERATION_NOTE = (
    " Generation tasks (greedy generate_until, model.generate()): pass@1 = share of items whose completion "
    "passes its tests in ppframework's sandbox (n items in brackets), ROUGE F1 with stemming; prompts, "
    "post-processing and scoring are the built-in generation tasks', but the harness batches the prompts "
    "sorted by length (docs/evaluation.md); forwards counts log-likelihood forwards only."
)


def generation_table(report: EvalReport) -> list[str]:
    """Markdown lines of the generation tasks (none when they did not run)."""
    tasks = list(report.rows[0].generation) if report.rows else []
    if not tasks:
        return []
    header = "| method | " + " | ".join(
        f"{t} {'R-1 / R-2 / R-L' if t == 'xsum' else 'pass@1'} | {t} decode tok/s (ratio) | {t} prefill s"
        for t in tasks
    )
    header = header.replace("| method |", "| method | decode realised |", 1)
    lines = ["", header + " |", "|---|---|" + "---|---|---|" * len(tasks)]
    for row in report.rows:
        cells = [_fmt(row.decode_realised_ratio)]
        for task in tasks:
            g = row.generation.get(task)
            if g is None:
                cells += ["-", "-", "-"]
                continue
            m = g["metrics"]
            quality = (
                f"{m['rouge1']:.4f} / {m['rouge2']:.4f} / {m['rougeL']:.4f}"
                if task == "xsum"
                else f"{_fmt(m.get('pass@1'), '.4f')} ({g['n_items']})"
            )
            tps = f"{_fmt(g['decode_tokens_per_s'], '.1f')} ({_fmt(g['decode_tps_ratio'], '.3f')})"
            cells += [quality, tps, _fmt(g["prefill_s"], ".2f")]
        lines.append(f"| {row.method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "generation: greedy model.generate() with the KV cache, prompts in input order, left padding, batch "
        f"{report.settings['evaluation']['generation']['batch_size']}; pass@1 = share of items whose program "
        "passes its tests in the sandbox (n items in brackets); ROUGE F1 with stemming. decode tok/s = new "
        "tokens after each row's first / decode seconds, ratio = method / dense on the same task (batches "
        "end when their last row stops, so it depends on the lengths generated); prefill s = total prompt "
        "forwards, the method's decision included. decode realised = share of the decoder's prunable "
        "projection weights the decode steps removed (mean over generate calls; a prefill: dense method "
        "prunes only there).",
    ]
    return lines


def fidelity_table(report: EvalReport) -> list[str]:
    """Markdown lines of the measures without future tokens (none when they did not run): top-1 and KL
    per prompt set, their mean top-1, continuation perplexity per corpus."""
    measured = [r.fidelity for r in report.rows if r.fidelity is not None]
    if not measured:
        return []
    sets = list(dict.fromkeys(name for f in measured for name in f["prompt_sets"]))
    corpora = list(dict.fromkeys(name for f in measured for name in f["continuation_perplexity"]))
    header = (
        ["decode realised"]
        + [f"{name} top-1 / KL" for name in sets]
        + (["mean top-1"] if sets else [])
        + [f"{name} cont. ppl" for name in corpora]
    )
    lines = ["", "| method | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for row in report.rows:
        fid = row.fidelity or {}
        cells = [_fmt(fid.get("decode_realised_ratio"))]
        for name in sets:
            scores = (fid.get("prompt_sets") or {}).get(name)
            cells.append(
                "-" if scores is None else f"{_fmt(scores['top1'], '.4f')} / {_fmt(scores['kl'], '.5f')}"
            )
        if sets:
            cells.append(_fmt(mean_top1(fid), ".4f"))
        for name in corpora:
            ppl = (fid.get("continuation_perplexity") or {}).get(name)
            cells.append("-" if ppl is None else _fmt(ppl["perplexity"], ".3f"))
        lines.append(f"| {row.method} | " + " | ".join(cells) + " |")
    plan = report.settings.get("resolved", {}).get("fidelity") or {}
    prompts = ", ".join(f"{n} {k}" for n, k in (plan.get("prompts") or {}).items()) or "none"
    batch, new_tokens = plan.get("batch_size", "?"), plan.get("new_tokens", "?")
    lines += [
        "",
        "measures without future tokens (docs/evaluation.md): the method decides on the prompt alone (a "
        f"batch of {batch} left-padded prompts per decision; prompts: {prompts}) and the dense model's "
        f"greedy continuation (up to {new_tokens} tokens, to the first EOS) is teacher-forced under that "
        "decision; top-1 = share of tokens where the method's argmax is the dense token, KL = mean "
        "KL(dense || method) per token in nats; mean top-1 averages the prompt sets. "
        f"cont. ppl: windows of {plan.get('window_len', '?')} tokens, {plan.get('window_batch', '?')} per "
        f"decision made on the first {plan.get('prefix_len', '?')}, perplexity of the rest. decode "
        "realised = share of the decoder's prunable projection weights the teacher-forced decode steps "
        "removed (mean over the measures).",
    ]
    return lines
