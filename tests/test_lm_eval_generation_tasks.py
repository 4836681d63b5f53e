"""Offline lm-evaluation-harness configs of the generation tasks (HumanEval, MBPP, XSum).

They must give the built-in generation tasks' prompts, stop strings and scores (they call the same
code), load without the hub, run generated code only after the opt-in, and run end to end through
``simple_evaluate`` (``harness.run_lm_eval``) on a tiny random model.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("rouge_score")

from ppframework import harness  # noqa: E402
from ppframework.config import RunConfig  # noqa: E402
from ppframework.errors import ConfigError  # noqa: E402
from ppframework.evaluate import EvalReport, EvalRow, lm_eval_table  # noqa: E402
from ppframework.generation.tasks import get_generation_task, xsum_prompt  # noqa: E402
from ppframework.testing.tiny import tiny_model, tiny_tokenizer  # noqa: E402

TASKS = list(harness.OFFLINE_GENERATION_TASKS)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def data_dir() -> Path:
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not (path / "generation").is_dir():
        pytest.skip("shared data folder has no generation/ sub-folder")
    return path


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[Path, dict[str, list[str]]]:
    folder = tmp_path_factory.mktemp("gen-tasks")
    return folder, harness.write_offline_tasks(folder, data_dir, TASKS)


@pytest.fixture(scope="module")
def loaded(written: tuple[Path, dict[str, list[str]]]) -> dict[str, Any]:
    folder, local = written
    plan = harness.LmEvalPlan(TASKS, local, folder, None, harness.LM_EVAL_VERSION)
    return plan.manager().load_task_or_group(TASKS)


@pytest.fixture(scope="module")
def utils(written: tuple[Path, dict[str, list[str]]]) -> ModuleType:
    """The written ``utils.py``, imported by path as the harness does."""
    spec = importlib.util.spec_from_file_location("ppf_gen_utils_test", written[0] / "utils.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _run_config(tmp_path: Path, data_dir: Path, *, allow_code: bool) -> RunConfig:
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"line {i} of a small text" for i in range(50)) + "\n")
    return RunConfig.model_validate(
        {
            "data": {
                "name": str(text),
                "seq_len": 32,
                "batch_size": 4,
                "max_batches": 2,
                "data_dir": str(data_dir),
            },
            "methods": [],
            "progress": False,
            "evaluation": {
                "lm_eval": {
                    "enabled": True,
                    "tasks": TASKS,
                    "limit": 2,
                    "batch_size": 2,
                    "allow_code_execution": allow_code,
                },
                "generation": {"enabled": False, "timeout_s": 5.0},
            },
        }
    )


def test_configs_are_written_and_load_offline(
    written: tuple[Path, dict[str, list[str]]], loaded: Any
) -> None:
    folder, local = written
    assert sorted(local) == sorted(TASKS)
    for name in TASKS:
        text = (folder / f"{name}.yaml").read_text()
        assert "@GENERATION@" not in text and all(f in text for f in local[name])
        assert all(Path(f).is_file() for f in local[name])
        task, builtin = loaded[name], get_generation_task(name)
        assert task.OUTPUT_TYPE == "generate_until"
        kwargs = task.config.generation_kwargs
        assert kwargs["do_sample"] is False and kwargs["max_gen_toks"] == builtin.max_new_tokens
        # XSum stops only at EOS: the built-in stop counts only after some text, so utils cuts the line
        assert kwargs["until"] == ([] if name == "xsum" else list(builtin.stop))
        assert getattr(task, "UNSAFE_CODE", False) is (name != "xsum")
        assert set(task._metric_fn_list) == set(builtin.metric_names)


def test_prompts_equal_the_builtin_tasks(loaded: Any, data_dir: Path) -> None:
    for name in TASKS:
        task = loaded[name]
        doc = next(iter(task.eval_docs))
        item = get_generation_task(name).load(data_dir, limit=1)[0]
        assert task.doc_to_text(doc) == item.prompt
        assert task.fewshot_context(doc, 0) == item.prompt  # what generate_until receives


def test_xsum_chat_form_and_cut_follow_the_run_tokenizer(
    loaded: Any, utils: ModuleType, data_dir: Path
) -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
    )
    doc = next(iter(loaded["xsum"].eval_docs))
    settings = harness.GenerationSettings(tokenizer, lambda new: 300 - new, 5.0, False)
    with harness._generation_context(settings):
        prompt = utils.xsum_prompt(doc)
    item = get_generation_task("xsum").load(data_dir, limit=1, tokenizer=tokenizer, max_prompt_tokens=236)[0]
    assert prompt == item.prompt and item.reference["truncated"]
    assert prompt.startswith("<|user|>Summarize") and len(tokenizer(prompt)["input_ids"]) <= 236
    assert utils.xsum_prompt(doc) == xsum_prompt(doc["document"].strip())  # outside ppf eval: plain form


def test_process_results_score_as_the_builtin_tasks(loaded: Any, utils: ModuleType) -> None:
    he = next(iter(loaded["humaneval"].eval_docs))
    solution = "\n" + he["canonical_solution"]  # the prompt is stripped: the body starts on a new line
    assert loaded["humaneval"].process_results(he, [solution]) == {"pass@1": 1.0}
    assert loaded["humaneval"].process_results(he, ["\n    return None\n"]) == {"pass@1": 0.0}
    mbpp = next(iter(loaded["mbpp"].eval_docs))
    assert loaded["mbpp"].process_results(mbpp, [mbpp["code"].replace("\r\n", "\n")]) == {"pass@1": 1.0}
    assert loaded["mbpp"].process_results(mbpp, ["def nothing():\n    pass\n"]) == {"pass@1": 0.0}
    xsum = next(iter(loaded["xsum"].eval_docs))
    scores = loaded["xsum"].process_results(xsum, ["\n " + xsum["summary"] + "\nA second line."])
    assert scores == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    # the code scorers refuse inside a run without the opt-in
    settings = harness.GenerationSettings(None, lambda new: None, 5.0, False)
    with (
        harness._generation_context(settings),
        pytest.raises(ConfigError, match="evaluation.lm_eval.allow_code_execution"),
    ):
        utils.humaneval_results(he, [solution])


def test_code_tasks_need_the_generation_opt_in(tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"evaluation.lm_eval.tasks\[0\]: 'humaneval'.*allow_code_execution"
    ):
        harness.plan_lm_eval(_run_config(tmp_path, data_dir, allow_code=False))
    plan = harness.plan_lm_eval(_run_config(tmp_path, data_dir, allow_code=True))
    try:
        assert sorted(plan.local) == sorted(TASKS) and not plan.stock
        assert plan.allow_code_execution and plan.code_timeout_s == 5.0
    finally:
        plan.close()


def test_run_lm_eval_end_to_end_on_a_tiny_model(tmp_path: Path, data_dir: Path) -> None:
    cfg = _run_config(tmp_path, data_dir, allow_code=True)
    plan = harness.plan_lm_eval(cfg)
    # 4096 positions so HumanEval's prompts (one token per character here) fit with 256 new tokens
    model, tokenizer = tiny_model("llama", max_position_embeddings=4096), tiny_tokenizer()
    try:
        run = harness.run_lm_eval(model, tokenizer, plan, cfg.evaluation.lm_eval, max_length=1024)
    finally:
        plan.close()
    assert sorted(run.tasks) == sorted(TASKS)
    for name in ("humaneval", "mbpp"):
        assert run.tasks[name]["n_items"] == 2 and run.tasks[name]["pass@1"] in (0.0, 0.5, 1.0)
    assert run.tasks["xsum"]["n_items"] == 2
    assert all(0.0 <= run.tasks["xsum"][m] <= 1.0 for m in ("rouge1", "rouge2", "rougeL"))
    assert run.mean_acc is None and run.n_tasks_in_mean == 0  # no acc task
    # outside generation, max_length is untouched (log-likelihood truncation as before)
    lm = harness.make_hflm(model, tokenizer, 2, 100)
    assert lm.max_length == 100 and lm.prompt_limit(64) == 100 and lm.prompt_limit(4090) == 6
    # a prompt longer than the model allows is an error, never cut from the left
    plan = harness.plan_lm_eval(cfg)
    try:
        with pytest.raises(ConfigError, match="prompt of"):
            harness.run_lm_eval(tiny_model("llama"), tokenizer, plan, cfg.evaluation.lm_eval, max_length=None)
    finally:
        plan.close()


def test_lm_eval_table_shows_generation_metrics() -> None:
    rows = [
        EvalRow(
            method=label,
            target_ratio=0.0,
            lm_eval={
                "boolq": {"acc": 0.6, "acc_stderr": 0.1, "n_items": 5},
                "humaneval": {"pass@1": value, "pass@1_stderr": 0.1, "n_items": 4},
                "xsum": {"rouge1": 0.3, "rouge2": 0.1, "rougeL": 0.25, "n_items": 4},
            },
            lm_eval_mean_acc=0.6,
            lm_eval_batches={"forwards": 3},
        )
        for label, value in (("dense", 0.5), ("pp 40%", 0.25))
    ]
    settings = {
        "resolved": {
            "lm_eval": {"version": "0.4.13", "local_tasks": {"boolq": [], "humaneval": [], "xsum": []}}
        }
    }
    lines = lm_eval_table(EvalReport(rows, settings, None, {}, 0.0, []))
    text = "\n".join(lines)
    assert (
        "| method (lm-eval) | boolq | humaneval pass@1 | xsum R-1 / R-2 / R-L | mean acc | forwards |" in text
    )
    assert "| dense | 0.6000 | 0.5000 (4) | 0.3000 / 0.1000 / 0.2500 | 0.6000 | 3 |" in text
    assert "| pp 40% | 0.6000 | 0.2500 (4) |" in text and "sandbox" in text


def test_missing_local_generation_file_is_an_error_not_the_hub_task(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "generation" / "xsum").mkdir(parents=True)  # the folder, but no test.jsonl
    cfg = _run_config(tmp_path, data, allow_code=False)
    cfg.evaluation.lm_eval.tasks = ["xsum"]
    with pytest.raises(
        ConfigError, match=r"evaluation.lm_eval.tasks\[0\]: 'xsum' reads .*generation/xsum/test\.jsonl"
    ):
        harness.plan_lm_eval(cfg)
