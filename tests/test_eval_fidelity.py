"""``evaluation.fidelity`` in ``ppf eval``: fidelity to dense and continuation perplexity per method row,
their csv columns and markdown table, the generation frontier plot, and bad inputs caught early."""

from __future__ import annotations

import csv
import gzip
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

import ppframework.evaluate
from ppframework import cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOT = "fidelity_vs_runtime.png"


def _prompt_data(root: Path) -> Path:
    """A data folder with three XSum and three HumanEval items (the only fields the tasks read)."""
    (root / "generation" / "xsum").mkdir(parents=True)
    xsum = [
        {"id": str(i), "document": "The river rose in the valley. " * (2 + i), "summary": "A river rose."}
        for i in range(3)
    ]
    (root / "generation" / "xsum" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in xsum))
    (root / "generation" / "humaneval").mkdir(parents=True)
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
    with gzip.open(root / "generation" / "humaneval" / "HumanEval.jsonl.gz", "wt") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in humaneval)
    return root


def _config(tmp_path: Path, model_dir: Path, text_file: Path, runtime: bool, **fidelity: Any) -> Path:
    config = {
        "model": {"name": str(model_dir), "device": "cpu"},
        "data": {
            "name": str(text_file),
            "data_dir": str(_prompt_data(tmp_path / "data")),
            "seq_len": 32,
            "batch_size": 4,
            "max_batches": 2,
            "window_policy": "contiguous",
        },
        "calibration": {
            "dataset": str(text_file),
            "n_samples": 8,
            "batch_size": 4,
            "seq_len": 100,
            "cache_dir": str(tmp_path / "cache"),
        },
        "methods": [
            {"preset": "pp", "pruning": {"ratio": 0.2, "skip_layers": [0]}},
            {"preset": "pp", "pruning": {"ratio": 0.4, "skip_layers": [0]}},
            {"preset": "flap", "pruning": {"ratio": 0.4, "skip_layers": [0]}},
        ],
        "evaluation": {
            "perplexity": False,
            "zeroshot": {"enabled": False},
            "runtime": {"enabled": runtime, "repeats": 2, "warmup": 0},
            "fidelity": {
                "enabled": True,
                "prompt_sets": ["xsum", "humaneval"],
                "prompts": 3,
                "new_tokens": 6,
                "windows": 4,
                "batch_size": 2,
            }
            | fidelity,
        },
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_ppf_eval_fidelity_rows_csv_table_and_frontier_plot(tmp_path, tiny_model_dir, tiny_text_file, capsys):
    config = _config(tmp_path, tiny_model_dir("llama-gqa"), tiny_text_file, runtime=True)
    out = tmp_path / "out"
    assert cli.main(["eval", str(config), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "results.json").read_text())
    rows = {row["method"]: row for row in report["rows"]}
    assert list(rows) == ["dense", "pp 20%", "pp 40%", "flap 40%"]
    corpus = tiny_text_file.name  # the default corpus is data.name, keyed by its file name
    for label, row in rows.items():
        fid = row["fidelity"]
        assert set(fid["prompt_sets"]) == {"xsum", "humaneval"} and set(fid["continuation_perplexity"]) == {
            corpus
        }
        for scores in fid["prompt_sets"].values():
            assert len(scores["per_prompt"]) == 3 and 0 < scores["tokens"] <= 3 * 6
            if label == "dense":
                assert scores["top1"] == 1.0 and scores["kl"] == 0.0
            else:
                assert 0.0 <= scores["top1"] <= 1.0 and scores["kl"] > 0.0
        ppl = fid["continuation_perplexity"][corpus]
        assert ppl["windows"] == 4 and ppl["prefix_len"] == 16 and ppl["tokens"] == 4 * 16
        assert math.isfinite(ppl["perplexity"])
        mean = (fid["prompt_sets"]["xsum"]["top1"] + fid["prompt_sets"]["humaneval"]["top1"]) / 2
        assert fid["mean_top1"] == pytest.approx(mean)
    assert rows["pp 40%"]["time_ratio"] is not None
    resolved = report["settings"]["resolved"]["fidelity"]
    assert resolved["prompts"] == {"xsum": 3, "humaneval": 3} and resolved["window_batch"] == 2

    with (out / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    for column in ("fid_mean_top1", "fid_xsum_top1", "fid_humaneval_kl", f"cont_ppl_{corpus}"):
        assert column in table[0]
    assert float(table[0]["fid_xsum_top1"]) == 1.0 and float(table[0]["fid_humaneval_kl"]) == 0.0

    markdown = (out / "results.md").read_text()
    header = (
        "| method | decode realised | xsum top-1 / KL | humaneval top-1 / KL | mean top-1 "
        f"| {corpus} cont. ppl |"
    )
    assert header in markdown and header in printed
    assert "| dense | - | 1.0000 / 0.00000 | 1.0000 / 0.00000 | 1.0000 |" in markdown
    # the decode steps' share of removed weights, from the teacher-forced measures (pp: its decisions')
    assert rows["dense"]["decode_realised_ratio"] is None
    for label in ("pp 20%", "pp 40%", "flap 40%"):
        assert 0 < rows[label]["decode_realised_ratio"] < 1
        assert f"| {label} | {rows[label]['decode_realised_ratio']:.3f} |" in markdown
    assert (out / PLOT).read_bytes()[:8] == PNG_SIGNATURE and str(out / PLOT) in report["plots"]


def test_no_frontier_plot_without_measured_runtime(tmp_path, tiny_model_dir, tiny_text_file):
    config = _config(
        tmp_path, tiny_model_dir("llama-gqa"), tiny_text_file, runtime=False, prompt_sets=["xsum"]
    )
    out = tmp_path / "out"
    assert cli.main(["eval", str(config), "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "results.json").read_text())
    assert all(
        row["time_ratio"] is None and row["fidelity"]["mean_top1"] is not None for row in report["rows"]
    )
    assert not (out / PLOT).exists() and report["plots"] == []


@pytest.mark.parametrize(
    ("fidelity", "message"),
    [
        ({"prompt_sets": ["xsum", "gsm8k"]}, "evaluation.fidelity.prompt_sets[1]"),
        ({"prompt_sets": ["mbpp"]}, "evaluation.fidelity.prompt_sets[0]: mbpp: data file"),
        ({"corpora": ["no-such-corpus.txt"]}, "evaluation.fidelity.corpora[0]: 'no-such-corpus.txt'"),
        ({"prompts": 0}, "evaluation.fidelity.prompts"),
        ({"prefix_len": 32}, "evaluation.fidelity.prefix_len: 32 must be below"),
        ({"batch_size": 8}, "evaluation.fidelity.batch_size: 8 exceeds evaluation.fidelity.windows"),
    ],
)
def test_bad_fidelity_input_fails_before_the_model_loads(
    tmp_path, tiny_model_dir, tiny_text_file, capsys, monkeypatch, fidelity, message
):
    def no_model(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was loaded before the bad input was caught")

    monkeypatch.setattr(ppframework.evaluate.protocol, "load_model", no_model)
    config = _config(tmp_path, tiny_model_dir("llama-gqa"), tiny_text_file, runtime=False, **fidelity)
    assert cli.main(["eval", str(config), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
