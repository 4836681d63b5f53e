"""``ppf generate`` and the generation tasks of ``ppf eval`` end to end on tiny models."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

import ppframework.generation.compare
from ppframework import cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _config(
    tmp_path: Path, model_dir: Path, text_file: Path, data_dir: Path | None = None, **extra: Any
) -> Path:
    data: dict[str, Any] = {"name": str(text_file), "seq_len": 32, "batch_size": 4, "max_batches": 3}
    if data_dir is not None:  # the generation tasks' data folder
        data["data_dir"] = str(data_dir)
    config = {
        "model": {"name": str(model_dir), "device": "cpu"},
        "data": data,
        "calibration": {
            "dataset": str(text_file),
            "n_samples": 8,
            "batch_size": 4,
            "seq_len": 128,
            "cache_dir": str(tmp_path / "cache"),
        },
        "methods": [
            {"preset": "pp", "pruning": {"ratio": 0.4, "skip_layers": [0]}},
            {"preset": "flap", "pruning": {"ratio": 0.4, "skip_layers": [0]}, "decode": "dense"},
        ],
        **extra,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _generation_data(root: Path) -> Path:
    """A data folder in the shared folder's layout, with tiny items the char-level model can hold."""
    humaneval = [
        {
            "task_id": f"HumanEval/{i}",
            "prompt": f"def f{i}(x):\n    '''Add {i}.'''\n",
            "entry_point": f"f{i}",
            "canonical_solution": f"    return x + {i}\n",
            "test": f"def check(c):\n    assert c(1) == {1 + i}\n",
        }
        for i in range(3)
    ]
    (root / "generation" / "humaneval").mkdir(parents=True)
    with gzip.open(root / "generation" / "humaneval" / "HumanEval.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in humaneval)
    mbpp = [
        {
            "task_id": 11 + i,
            "text": f"Add {i}.",
            "code": f"def g(x):\r\n    return x + {i}",
            "test_list": [f"assert g(1) == {1 + i}"],
            "test_setup_code": "",
            "challenge_test_list": [],
        }
        for i in range(3)
    ]
    (root / "generation" / "mbpp").mkdir(parents=True)
    (root / "generation" / "mbpp" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mbpp))
    xsum = [
        {"id": str(i), "document": "The river rose in the valley. " * (2 + i), "summary": "A river rose."}
        for i in range(3)
    ]
    (root / "generation" / "xsum").mkdir(parents=True)
    (root / "generation" / "xsum" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in xsum))
    return root


def test_ppf_generate_side_by_side(tmp_path, tiny_model_dir, tiny_text_file, capsys):
    config = _config(tmp_path, tiny_model_dir("llama-gqa"), tiny_text_file)
    out = tmp_path / "out"
    args = ["generate", str(config), "--prompt", "Hello there", "--prompt", "The castle on the island"]
    assert cli.main([*args, "--max-new-tokens", "6", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in report["rows"]] == ["dense", "pp 40%", "flap 40%"]
    assert [r["decode"] for r in report["rows"]] == ["-", "frozen", "dense"]
    for row in report["rows"]:
        assert len(row["completions"]) == 2 and all(0 < n <= 6 for n in row["new_tokens"])
        assert row["prefill_s"] > 0 and row["decode_tokens_per_s"] > 0
    assert "| pp 40% | frozen |" in printed and "decode tok/s (ratio)" in printed
    assert (out / "results.md").read_text().startswith("model ")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompt", "   "], "--prompt: prompt 1 is empty"),
        ([], "--prompt: give at least one prompt"),
        (["--prompt", "x" * 300], "exceeds the model's 256 positions"),
        (
            ["--prompt", "x" * 150, "--set", "methods.0.history.beyond=refuse"],
            "more than the history's 128 positions",
        ),
        (["--prompt", "hi", "--set", "methods.0.decode=frozn"], "methods[0].decode"),
        (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
        # a non-UTF-8 argv byte arrives as a lone surrogate (os.fsdecode's surrogateescape)
        (["--prompt", "ok", "--prompt", b"caf\xe9".decode("utf-8", "surrogateescape")], "--prompt: prompt 2"),
    ],
)
def test_ppf_generate_bad_input_fails_early_naming_the_field(
    tmp_path, tiny_model_dir, tiny_text_file, capsys, monkeypatch, extra, message
):
    config = _config(tmp_path, tiny_model_dir("llama"), tiny_text_file)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was caught")

    monkeypatch.setattr(ppframework.generation.compare, "load_model", no_model)
    assert cli.main(["generate", str(config), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_ppf_eval_generation_tasks(tmp_path, tiny_model_dir, tiny_text_file, capsys):
    data = _generation_data(tmp_path / "data")
    evaluation = {
        "perplexity": False,
        "zeroshot": {"enabled": False},
        "runtime": {"enabled": False},
        "generation": {
            "enabled": True,
            "batch_size": 2,
            "tasks": [
                {"name": "humaneval", "max_new_tokens": 8},
                {"name": "mbpp", "max_new_tokens": 8, "limit": 2},
                {"name": "xsum", "max_new_tokens": 8},
            ],
            "timeout_s": 5,
            "allow_code_execution": True,
        },
    }
    config = _config(
        tmp_path, tiny_model_dir("llama-gqa"), tiny_text_file, data_dir=data, evaluation=evaluation
    )
    out = tmp_path / "out"
    assert cli.main(["eval", str(config), "--out", str(out), "--no-progress", "--limit", "3"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "results.json").read_text())
    rows = report["rows"]
    assert [r["method"] for r in rows] == ["dense", "pp 40%", "flap 40%"]
    for row in rows:
        gen = row["generation"]
        assert (
            gen["humaneval"]["n_items"] == 3 and gen["mbpp"]["n_items"] == 2 and gen["xsum"]["n_items"] == 3
        )
        assert 0.0 <= gen["humaneval"]["metrics"]["pass@1"] <= 1.0
        assert set(gen["xsum"]["metrics"]) == {"rouge1", "rouge2", "rougeL"}
        assert gen["mbpp"]["decode_tps_ratio"] > 0
    assert rows[0]["generation"]["xsum"]["decode_tps_ratio"] == 1.0
    assert rows[0]["realised_ratio"] == 0.0 and 0.0 < rows[1]["realised_ratio"] < 0.4  # from the prefills
    records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(records) == 3 * (3 + 2 + 3)
    assert {"method", "task", "item_id", "completion"} <= set(records[0])
    assert (
        "humaneval R-1" not in printed and "humaneval pass@1" in printed and "xsum R-1 / R-2 / R-L" in printed
    )
    csv_header = (out / "results.csv").read_text().splitlines()[0]
    assert "gen_humaneval_pass@1" in csv_header and "gen_xsum_rougeL" in csv_header
    for task in ("humaneval", "mbpp", "xsum"):
        assert (out / f"{task}_vs_decode_runtime.png").read_bytes()[:8] == PNG_SIGNATURE


def test_ppf_eval_generation_missing_data_fails_before_the_model_loads(
    tmp_path, tiny_model_dir, tiny_text_file, capsys
):
    evaluation = {
        "zeroshot": {"enabled": False},
        "generation": {"enabled": True, "tasks": ["mbpp"], "allow_code_execution": True},
    }
    config = _config(tmp_path, tiny_model_dir("llama"), tiny_text_file, evaluation=evaluation)
    text = yaml.safe_load(config.read_text())
    text["data"]["data_dir"] = str(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    config.write_text(yaml.safe_dump(text))
    assert cli.main(["eval", str(config), "--no-progress"]) == 2
    assert "evaluation.generation.tasks[0]" in capsys.readouterr().err


def test_ppf_eval_code_prompt_longer_than_the_history_is_an_error_under_beyond_refuse(
    tmp_path, tiny_model_dir, tiny_text_file, capsys
):
    data = _generation_data(tmp_path / "data")
    evaluation = {
        "perplexity": False,
        "zeroshot": {"enabled": False},
        "runtime": {"enabled": False},
        "generation": {
            "enabled": True,
            "tasks": [{"name": "humaneval", "max_new_tokens": 8}],
            "allow_code_execution": True,
        },
    }
    config = _config(tmp_path, tiny_model_dir("llama"), tiny_text_file, data_dir=data, evaluation=evaluation)
    text = yaml.safe_load(config.read_text())
    text["calibration"]["seq_len"] = 20
    text["data"]["seq_len"] = 16
    for method in text["methods"]:  # the default (extend) runs such prompts; refusing is asked for
        method.setdefault("history", {})["beyond"] = "refuse"
    config.write_text(yaml.safe_dump(text))
    assert cli.main(["eval", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "evaluation.generation.tasks[0]" in err and "calibration.seq_len" in err


def test_ppf_eval_keeps_finished_methods_when_a_later_one_crashes(
    tmp_path, tiny_model_dir, tiny_text_file, capsys, monkeypatch
):
    import ppframework.evaluate

    data = _generation_data(tmp_path / "data")
    evaluation = {
        "perplexity": False,
        "zeroshot": {"enabled": False},
        "runtime": {"enabled": False},
        "generation": {"enabled": True, "batch_size": 2, "tasks": [{"name": "xsum", "max_new_tokens": 4}]},
    }
    config = _config(tmp_path, tiny_model_dir("llama"), tiny_text_file, data_dir=data, evaluation=evaluation)
    real = ppframework.evaluate.protocol.run_generation_tasks
    calls = []

    def crash_on_the_last_method(*args, **kwargs):
        calls.append(kwargs["label"])
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(ppframework.evaluate.protocol, "run_generation_tasks", crash_on_the_last_method)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli.main(["eval", str(config), "--out", str(out), "--no-progress"])
    report = json.loads((out / "results.json").read_text())
    assert report["complete"] is False
    assert [r["method"] for r in report["rows"]] == ["dense", "pp 40%"]
    assert report["rows"][1]["generation"]["xsum"]["n_items"] == 3
    assert "partial results" in (out / "results.md").read_text()
    assert len((out / "generations.jsonl").read_text().splitlines()) == 6


def _truncate_humaneval(root: Path) -> str:
    path = root / "generation" / "humaneval" / "HumanEval.jsonl.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "HumanEval.jsonl.gz is damaged or cut short"


def _bad_mbpp_line(root: Path) -> str:
    path = root / "generation" / "mbpp" / "test.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = '{"task_id": 12, "text": "Add 1."'  # cut off mid-record
    path.write_text("\n".join(lines) + "\n")
    return "test.jsonl: line 2 is not valid JSON"


def _xsum_without_document(root: Path) -> str:
    path = root / "generation" / "xsum" / "test.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = json.dumps({"id": "2", "summary": "A river rose."})
    path.write_text("\n".join(lines) + "\n")
    return "test.jsonl: line 3 (item '2') has no 'document'"


@pytest.mark.parametrize(
    ("task", "damage"),
    [("humaneval", _truncate_humaneval), ("mbpp", _bad_mbpp_line), ("xsum", _xsum_without_document)],
)
def test_ppf_eval_damaged_generation_data_fails_before_the_model_loads(
    tmp_path, tiny_model_dir, tiny_text_file, capsys, monkeypatch, task, damage
):
    import ppframework.evaluate

    data = _generation_data(tmp_path / "data")
    expected = damage(data)
    evaluation = {
        "zeroshot": {"enabled": False},
        "generation": {"enabled": True, "tasks": [task], "allow_code_execution": True},
    }
    config = _config(tmp_path, tiny_model_dir("llama"), tiny_text_file, data_dir=data, evaluation=evaluation)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the damaged data was reported")

    monkeypatch.setattr(ppframework.evaluate.protocol, "load_model", no_model)
    assert cli.main(["eval", str(config), "--no-progress", "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert "evaluation.generation.tasks[0]" in err and expected in err, err
    assert "Traceback" not in err


def test_ppf_eval_interrupted_generation_keeps_the_finished_completions(
    tmp_path, tiny_model_dir, tiny_text_file, capsys, monkeypatch
):
    import ppframework.evaluate

    data = _generation_data(tmp_path / "data")
    evaluation = {
        "perplexity": False,
        "zeroshot": {"enabled": False},
        "runtime": {"enabled": False},
        "generation": {"enabled": True, "batch_size": 1, "tasks": [{"name": "xsum", "max_new_tokens": 4}]},
    }
    config = _config(tmp_path, tiny_model_dir("llama"), tiny_text_file, data_dir=data, evaluation=evaluation)
    real = ppframework.evaluate.protocol.run_generation_tasks

    def interrupt_after_the_first_batch(model, *args, **kwargs):
        generate, calls = model.generate, []

        def once(*a, **k):
            if calls:
                raise KeyboardInterrupt
            calls.append(1)
            return generate(*a, **k)

        monkeypatch.setattr(model, "generate", once)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(
        ppframework.evaluate.protocol, "run_generation_tasks", interrupt_after_the_first_batch
    )
    out = tmp_path / "out"
    assert cli.main(["eval", str(config), "--out", str(out), "--no-progress"]) == 130
    records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [(r["method"], r["task"], r["item_id"]) for r in records] == [("dense", "xsum", "0")]
    assert isinstance(records[0]["completion"], str)
