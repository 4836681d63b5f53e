"""lm-evaluation-harness path (``ppframework.harness``, ``evaluation.lm_eval``): offline task configs, the
HFLM wrapper with a pipeline attached, agreement with the built-in scorer, and ``ppf eval`` end to end.

Needs the ``lm-eval`` extra (skipped without it) and the shared data folder's ``zeroshot/``; never the
network (``HF_HUB_OFFLINE=1`` from conftest).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("lm_eval")

import ppframework.evaluate  # noqa: E402
from ppframework import cli, harness  # noqa: E402
from ppframework.api import build_pipeline  # noqa: E402
from ppframework.config import RunConfig  # noqa: E402
from ppframework.errors import ConfigError  # noqa: E402
from ppframework.testing.tiny import tiny_model, tiny_tokenizer  # noqa: E402
from ppframework.zeroshot import evaluate_tasks, score_requests  # noqa: E402

# Short prompts for the char-level tiny tokenizer; BoolQ passages are longer than max_length, so the
# left truncation is exercised too.
TASKS = ["winogrande", "arc_easy", "openbookqa", "boolq"]
LIMIT = 3
MAX_LENGTH = 100


@pytest.fixture
def zs_dir(shared_data_dir: Path) -> Path:
    if not (shared_data_dir / "zeroshot").is_dir():
        pytest.skip("shared data folder has no zeroshot/ sub-folder")
    return shared_data_dir


def run_config(tmp_path: Path, text_file: Path, data_dir: Path, **lm_eval: Any) -> RunConfig:
    return RunConfig.model_validate({
        "data": {"name": str(text_file), "seq_len": 32, "batch_size": 4, "max_batches": 2,
                 "window_policy": "contiguous", "data_dir": str(data_dir)},
        "calibration": {"dataset": str(text_file), "n_samples": 8, "batch_size": 4, "seq_len": MAX_LENGTH,
                        "cache_dir": str(tmp_path / "cache")},
        "methods": [
            {"preset": "flap", "pruning": {"ratio": 0.4, "skip_layers": [0]}},
            {"preset": "pp", "pruning": {"ratio": 0.4, "skip_layers": [0]}},
        ],
        "progress": False,
        "evaluation": {
            "lm_eval": {"enabled": True, "tasks": TASKS, "limit": LIMIT, "batch_size": 4} | lm_eval
        },
    })


# --------------------------------------------------------------------------- offline task configs


def test_offline_configs_are_filled_in_from_the_data_folder(tmp_path: Path, zs_dir: Path) -> None:
    written = harness.write_offline_tasks(tmp_path, zs_dir, [*harness.OFFLINE_TASKS, "gsm8k"])
    assert sorted(written) == sorted(harness.OFFLINE_TASKS)  # gsm8k has no offline config: stock
    assert (tmp_path / "utils.py").is_file()
    for task, files in written.items():
        text = (tmp_path / f"{task}.yaml").read_text()
        assert "@ZEROSHOT@" not in text and "@LM_EVAL_TASKS@" not in text
        assert all(Path(f).is_file() and f.startswith(str(zs_dir.resolve())) for f in files)
        assert all(f in text for f in files)
    assert written["piqa"][-1].endswith("valid-labels.lst")
    # no data folder with the files: nothing written, the stock (hub) tasks are used
    empty = tmp_path / "empty"
    empty.mkdir()
    assert harness.write_offline_tasks(tmp_path / "none", empty, ["boolq"]) == {}


def test_templates_ship_as_package_data() -> None:
    names = {p.name for p in harness.TEMPLATE_DIR.iterdir()}
    assert {f"{t}.yaml" for t in harness.OFFLINE_TASKS} | {"utils.py"} <= names
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"lm_eval_tasks/*.yaml", "lm_eval_tasks/*.py"' in pyproject
    assert f"lm_eval=={harness.LM_EVAL_VERSION}" in pyproject


@pytest.mark.slow
def test_offline_tasks_build_the_builtin_scorers_requests(tmp_path: Path, zs_dir: Path) -> None:
    """Every offline harness task gives, document by document, the same (context, continuation) pairs and
    gold index as the built-in scorer's items: same prompts, choices and labels from the same files."""
    from ppframework.zeroshot import load_task

    n_docs = 4
    written = harness.write_offline_tasks(tmp_path, zs_dir, harness.OFFLINE_TASKS)
    plan = harness.LmEvalPlan(list(harness.OFFLINE_TASKS), written, tmp_path, None, harness.LM_EVAL_VERSION)
    loaded = plan.manager().load_task_or_group(list(harness.OFFLINE_TASKS))
    for name in harness.OFFLINE_TASKS:
        task = loaded[name]
        items = load_task(name, limit=n_docs, data_dir=zs_dir)
        delimiter = task.config.target_delimiter
        for doc, item in zip(list(task.eval_docs)[:n_docs], items, strict=True):
            choices = task.doc_to_choice(doc)
            if task.multiple_input:  # WinoGrande: the options fill the context, one shared continuation
                pairs = [(c, delimiter + task.doc_to_target(doc)) for c in choices]
                gold = task.doc_to_text(doc)
            else:
                pairs = [(task.doc_to_text(doc), delimiter + c) for c in choices]
                gold = task.doc_to_target(doc)
            assert pairs == item.pairs(), name
            assert gold == item.label, name


@pytest.mark.slow
def test_bad_task_name_fails_before_the_model_loads(
    tmp_path: Path, tiny_text_file: Path, zs_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_model(*_: Any, **__: Any) -> None:
        raise AssertionError("the model must not load")

    monkeypatch.setattr(ppframework.evaluate.protocol, "load_model", no_model)
    cfg = run_config(tmp_path, tiny_text_file, zs_dir, tasks=["boolq", "no_such_task_xyz"])
    with pytest.raises(ConfigError, match=r"evaluation\.lm_eval\.tasks\[1\]: 'no_such_task_xyz'"):
        ppframework.evaluate.evaluate(cfg)
    bad_folder = run_config(tmp_path, tiny_text_file, zs_dir, include_path=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"evaluation\.lm_eval\.include_path"):
        ppframework.evaluate.evaluate(bad_folder)


def test_task_metrics_and_batch_summary() -> None:
    results = {
        "results": {"piqa": {"alias": "piqa", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.25,
                             "acc_norm_stderr,none": "N/A", "sample_len": 4},
                    "gsm8k": {"exact_match,strict-match": 0.125}},
        "n-samples": {"piqa": {"original": 1838, "effective": 4}},
    }
    assert harness._task_metrics(results) == {
        "piqa": {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.25, "n_items": 4},
        "gsm8k": {"exact_match,strict-match": 0.125},
    }
    log = [{"rows": 2, "width": 7, "masked": True, "lengths": [7, 5]},
           {"rows": 1, "width": 3, "masked": True, "lengths": [3]}]
    summary = harness._batch_summary(log)
    assert summary["forwards"] == 2 and summary["rows"] == [2, 1] and summary["widths"] == [7, 3]
    assert summary["masked"] and summary["digest"] != harness._batch_summary(log[::-1])["digest"]


def test_lm_eval_config_fields() -> None:
    with pytest.raises(Exception, match="batch_size"):
        RunConfig.model_validate({"evaluation": {"lm_eval": {"batch_size": "auto"}}})
    with pytest.raises(Exception, match="listed twice"):
        RunConfig.model_validate({"evaluation": {"lm_eval": {"tasks": ["piqa", "piqa"]}}})


# --------------------------------------------------------------------------- against the built-in scorer


@pytest.fixture(scope="module")
def model_and_tokenizer() -> tuple[Any, Any]:
    return tiny_model("llama"), tiny_tokenizer()


def _loglikelihoods(lm: Any, pairs: list[tuple[str, str]]) -> list[float]:
    from lm_eval.api.instance import Instance

    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    return [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]


PAIRS = [
    ("Question: Which gas do plants take in?\nAnswer:", " carbon dioxide"),
    ("Question: Which gas do plants take in?\nAnswer:", " oxygen"),
    ("The trophy did not fit in the suitcase because the", " trophy was too big."),
    ("x" * 150 + " and then", " it ended"),  # longer than MAX_LENGTH: left-truncated on both sides
    ("Is it", " yes"),
]


@pytest.mark.slow
def test_harness_equals_builtin_scorer_dense_and_pruned(
    tmp_path: Path, tiny_text_file: Path, zs_dir: Path, model_and_tokenizer: tuple[Any, Any]
) -> None:
    model, tok = model_and_tokenizer
    cfg = run_config(tmp_path, tiny_text_file, zs_dir)
    plan = harness.plan_lm_eval(cfg)
    try:
        assert sorted(plan.local) == sorted(TASKS) and plan.stock == []
        flap = build_pipeline(model, cfg, method_index=0, tokenizer=tok, progress=False)
        for pipe in (None, flap):  # flap is static: its decision does not depend on the batches
            if pipe is not None:
                pipe.attach()
            try:
                lm = harness.make_hflm(model, tok, batch_size=2, max_length=MAX_LENGTH)
                ours = score_requests(model, tok, PAIRS, batch_size=2, max_length=MAX_LENGTH, progress=False)
                assert _loglikelihoods(lm, PAIRS) == pytest.approx(ours, abs=1e-4)
                run = harness.run_lm_eval(model, tok, plan, cfg.evaluation.lm_eval, max_length=MAX_LENGTH)
                builtin = evaluate_tasks(model, tok, TASKS, limit=LIMIT, batch_size=4, data_dir=zs_dir,
                                         max_length=MAX_LENGTH, progress=False)
            finally:
                if pipe is not None:
                    pipe.detach()
            for result in builtin:
                theirs = run.tasks[result.task]
                assert theirs["n_items"] == LIMIT == result.n_items
                assert theirs["acc"] == pytest.approx(result.acc), result.task
                # acc_norm exactly where the stock task reports it (not BoolQ, WinoGrande)
                expected = None if result.acc_norm is None else pytest.approx(result.acc_norm)
                assert theirs.get("acc_norm") == expected, result.task
            assert run.batches["masked"] and run.batches["forwards"] == len(run.batches["rows"]) > 0
            assert max(run.batches["widths"]) <= MAX_LENGTH
        flap.release()
    finally:
        plan.close()


@pytest.mark.slow
def test_padding_is_masked_for_the_pipeline(
    tmp_path: Path, tiny_text_file: Path, zs_dir: Path, model_and_tokenizer: tuple[Any, Any]
) -> None:
    """A dynamic method (pp) attached: the harness's right padding reaches the model with a mask, so the
    pipeline sees the rows' real lengths; the composition is recorded and repeatable."""
    model, tok = model_and_tokenizer
    cfg = run_config(tmp_path, tiny_text_file, zs_dir, tasks=["winogrande"], limit=4)
    seen: list[list[int]] = []

    def record(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        seen.append(mask.sum(dim=1).tolist() if mask is not None else [])

    plan = harness.plan_lm_eval(cfg)
    try:
        runs = []
        for _ in range(2):
            pipe = build_pipeline(model, cfg, method_index=1, tokenizer=tok, progress=False)
            handle = model.register_forward_pre_hook(record, with_kwargs=True)
            with pipe:
                runs.append(
                    harness.run_lm_eval(model, tok, plan, cfg.evaluation.lm_eval, max_length=MAX_LENGTH)
                )
            handle.remove()
            pipe.release()
    finally:
        plan.close()
    first, second = runs
    assert first.batches == second.batches and first.tasks == second.tasks  # deterministic
    assert first.batches["masked"]
    lengths = seen[: first.batches["forwards"]]
    assert all(lengths) and any(min(row) < max(row) for row in lengths)  # padded rows were masked
    assert 0.0 <= first.tasks["winogrande"]["acc"] <= 1.0


# --------------------------------------------------------------------------- ppf eval end to end


def test_accuracy_prr_uses_the_harness_when_the_builtin_scorer_is_off() -> None:
    from ppframework.evaluate import EvalRow, accuracy_source, add_efficiency
    from ppframework.metrics.efficiency import accuracy_prr

    dense = EvalRow("dense", 0.0, lm_eval_mean_acc=0.60)
    method = EvalRow("pp 40%", 0.4, lm_eval_mean_acc=0.50, time_ratio=0.8)
    add_efficiency([dense, method], [])
    assert accuracy_source([dense, method]) == "lm_eval_mean_acc"
    assert method.accuracy_prr == pytest.approx(accuracy_prr(0.50, 0.60, 0.8, 1.0))
    # with the built-in scorer's mean present, it is the one used
    dense.mean_acc, method.mean_acc = 0.7, 0.4
    add_efficiency([dense, method], [])
    assert method.accuracy_prr == pytest.approx(accuracy_prr(0.4, 0.7, 0.8, 1.0))


@pytest.mark.slow
def test_ppf_eval_runs_lm_eval_tasks(
    tmp_path: Path, tiny_model_dir: Any, tiny_text_file: Path, zs_dir: Path
) -> None:
    config = {
        "model": {"name": str(tiny_model_dir("llama")), "device": "cpu"},
        "data": {"name": str(tiny_text_file), "seq_len": 32, "batch_size": 4, "max_batches": 2,
                 "window_policy": "contiguous", "data_dir": str(zs_dir)},
        "calibration": {"dataset": str(tiny_text_file), "n_samples": 8, "batch_size": 4,
                        "seq_len": MAX_LENGTH, "cache_dir": str(tmp_path / "cache")},
        "methods": [{"preset": "pp", "pruning": {"ratio": 0.4, "skip_layers": [0]}}],
        "evaluation": {
            "zeroshot": {"enabled": False},
            "lm_eval": {"enabled": True, "tasks": ["winogrande"], "batch_size": 4},
            "runtime": {"repeats": 1, "warmup": 0},
            "plot": False,
        },
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert cli.main(["eval", str(path), "--out", str(out), "--no-progress", "--limit", "2"]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["settings"]["evaluation"]["lm_eval"]["limit"] == 2  # --limit reaches the harness
    resolved = report["settings"]["resolved"]["lm_eval"]
    assert resolved["version"] == harness.LM_EVAL_VERSION and resolved["max_length"] == MAX_LENGTH
    assert list(resolved["local_tasks"]) == ["winogrande"]
    dense, pp = report["rows"]
    for row in (dense, pp):
        assert row["lm_eval"]["winogrande"]["n_items"] == 2 and "acc_norm" not in row["lm_eval"]["winogrande"]
        assert row["lm_eval_mean_acc"] == row["lm_eval"]["winogrande"]["acc"]
        assert row["lm_eval_batches"]["forwards"] >= 1 and row["mean_acc"] is None
    table = (out / "results.md").read_text()
    assert "| method (lm-eval) | winogrande |" in table
    assert f"lm-evaluation-harness {harness.LM_EVAL_VERSION}" in table
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows[1]["lm_eval_winogrande_acc"] != "" and rows[1]["lm_eval_mean_acc"] != ""
