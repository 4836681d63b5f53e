"""Bad and edge inputs through the ``ppf`` command line, on tiny models.

To add a case, append a :class:`Case` to :data:`CASES`: a ``mutate`` function edits the run config
(``env.run``), the ablation file (``env.ablation``) or files under ``env.tmp`` and returns extra
command-line arguments; ``expected`` is a fragment of the ``error: ...`` line. With
``before_model_load`` the case also asserts that no model was loaded (``load_model`` raises if it is
called). Every case must exit with ``exit_code`` and print no traceback.

The tests after the table cover what needs a model run: failed methods, partial results, the
calibration cache, strict JSON and the output-folder lock.
"""

from __future__ import annotations

import copy
import fcntl
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import ppframework.evaluate
import ppframework.models
import ppframework.runner
import ppframework.runner.results
import ppframework.runner.session
from ppframework import cli
from ppframework.ablation import load_ablation
from ppframework.errors import ConfigError

SEQ_LEN = 32


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@dataclass
class Env:
    """What a case can change: the run config, the ablation file, and a scratch folder."""

    tmp: Path
    model_dir: Path
    text_file: Path
    run: dict[str, Any]
    ablation: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    def model_copy(self) -> Path:
        """A private copy of the tiny model directory (for cases that damage it)."""
        target = self.tmp / "model-copy"
        if not target.exists():
            shutil.copytree(self.model_dir, target)
        self.run["model"]["name"] = str(target)
        return target

    def file(self, name: str, content: bytes | str) -> Path:
        path = self.tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path


@pytest.fixture
def env(tmp_path: Path, tiny_model_dir: Any, tiny_text_file: Path, isolated_cache: Path) -> Env:
    model_dir = tiny_model_dir("llama")
    run = {
        "model": {"name": str(model_dir), "device": "cpu"},
        "data": {
            "name": str(tiny_text_file),
            "seq_len": SEQ_LEN,
            "batch_size": 4,
            "max_batches": 3,
            "window_policy": "contiguous",
        },
        "calibration": {
            "dataset": str(tiny_text_file),
            "n_samples": 8,
            "batch_size": 4,
            "cache_dir": str(tmp_path / "calibration-cache"),
        },
        "methods": [
            {"preset": "pp", "pruning": {"ratio": 0.4, "skip_layers": [0]}},
            {"preset": "flap", "pruning": {"ratio": 0.2, "skip_layers": [0]}},
        ],
        "evaluation": {"zeroshot": {"enabled": False}, "runtime": {"repeats": 1}, "plot": False},
    }
    ablation = {
        "base": {key: copy.deepcopy(run[key]) for key in ("model", "data", "calibration")}
        | {"method": {"preset": "pp", "pruning": {"skip_layers": [0]}}},
        "variants": {"pp": {}, "random-probe": {"strategies": {"select_probe": "random"}}},
        "grid": {"pruning.ratio": [0.2, 0.4]},
    }
    return Env(tmp_path, model_dir, tiny_text_file, run, ablation, {"tiny_model_dir": tiny_model_dir})


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to load a model fails the test."""

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a model was loaded before the bad input was reported")

    for module in (ppframework.runner.session, ppframework.evaluate.protocol, ppframework.models.loading):
        monkeypatch.setattr(module, "load_model", forbidden)


def invoke(
    env: Env, command: str, extra: list[str], capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    """Write the config of ``command`` and run ``ppf command CONFIG --no-progress *extra``."""
    config = env.tmp / f"{command}.yaml"
    if not config.exists():  # a case may have written its own file
        data = env.ablation if command == "ablate" else env.run
        if command == "run":
            data = {k: v for k, v in data.items() if k != "evaluation"}
        config.write_text(yaml.safe_dump(data), encoding="utf-8")
    code = cli.main([command, str(config), "--no-progress", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------------------------ mutations


def _set(path: str, value: Any, target: str = "run") -> Callable[[Env], list[str]]:
    """A mutation that sets the dotted ``path`` of the run config (or ablation file) to ``value``."""

    def mutate(env: Env) -> list[str]:
        node: Any = getattr(env, target)
        parts = path.split(".")
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if isinstance(node, list):
            node[int(parts[-1])] = value
        else:
            node[parts[-1]] = value
        return []

    return mutate


def _args(*args: str) -> Callable[[Env], list[str]]:
    return lambda env: list(args)


def _out_is_file(env: Env) -> list[str]:
    return ["--out", str(env.file("results-file", "x"))]


def _points_is_file(env: Env) -> list[str]:
    out = env.tmp / "sweep-out"
    out.mkdir()
    (out / "points").write_text("not a folder")
    return ["--out", str(out)]


def _results_json_is_folder(env: Env) -> list[str]:
    out = env.tmp / "eval-out"
    (out / "results.json").mkdir(parents=True)
    return ["--out", str(out)]


def _out_under_file(env: Env) -> list[str]:
    return ["--out", str(env.file("plain-file", "x") / "sub")]


def _data_file(content: bytes, key: str = "data.name") -> Callable[[Env], list[str]]:
    def mutate(env: Env) -> list[str]:
        path = env.file("bad-data.txt", content)
        section, name = key.split(".")
        env.run[section][name] = str(path)
        return []

    return mutate


def _short_calibration_documents(env: Env) -> list[str]:
    path = env.file("short-docs.txt", "\n".join(["a few words only"] * 50))
    env.run["calibration"]["dataset"] = str(path)
    return []


def _tiny_text(env: Env) -> list[str]:
    path = env.file("tiny.txt", "\n".join(["Just one short line of text, nothing more."] * 3))
    env.run["data"]["name"] = str(path)
    return []


def _model_config(content: str) -> Callable[[Env], list[str]]:
    def mutate(env: Env) -> list[str]:
        (env.model_copy() / "config.json").write_text(content)
        return []

    return mutate


def _model_config_field(key: str, value: Any) -> Callable[[Env], list[str]]:
    """Set one field of the (copied) tiny model's config.json."""

    def mutate(env: Env) -> list[str]:
        path = env.model_copy() / "config.json"
        config = json.loads(path.read_text())
        config[key] = value
        path.write_text(json.dumps(config))
        return []

    return mutate


def _truncated_weights(env: Env) -> list[str]:
    weights = env.model_copy() / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return []


def _binary_config(env: Env) -> list[str]:
    (env.tmp / "run.yaml").write_bytes(b"model:\n  name: \xff\xfe\x00bad\n")
    return []


def _opt_model(seq_len: int) -> Callable[[Env], list[str]]:
    def mutate(env: Env) -> list[str]:
        env.run["model"]["name"] = str(env.extra["tiny_model_dir"]("opt"))
        env.run["data"]["seq_len"] = seq_len
        return []

    return mutate


def _variant(name: str, override: Any) -> Callable[[Env], list[str]]:
    def mutate(env: Env) -> list[str]:
        env.ablation["variants"][name] = override
        env.ablation["grid"] = {}
        return []

    return mutate


def _both(*mutations: Callable[[Env], list[str]]) -> Callable[[Env], list[str]]:
    return lambda env: [arg for m in mutations for arg in m(env)]


@dataclass(frozen=True)
class Case:
    """One bad input: what to change, the expected message fragment, and whether it must fail
    before any model loads."""

    id: str
    command: str
    mutate: Callable[[Env], list[str]]
    expected: str
    before_model_load: bool = True
    exit_code: int = 2


CASES: list[Case] = [
    # --- output folder (issue part 2)
    Case("run-out-is-file", "run", _out_is_file, "is an existing file, not a folder"),
    Case("eval-out-is-file", "eval", _out_is_file, "is an existing file, not a folder"),
    Case("ablate-out-is-file", "ablate", _out_is_file, "is an existing file, not a folder"),
    Case("run-out-under-file", "run", _out_under_file, "is a file, not a folder"),
    Case(
        "eval-results-json-is-folder",
        "eval",
        _results_json_is_folder,
        "eval-out/results.json is a folder, so the results cannot be written there",
    ),
    Case(
        "frontier-baseline-misspelt",
        "eval",
        _both(
            _set(
                "evaluation.frontier",
                {
                    "methods": [{"preset": p, "pruning": {"skip_layers": [0]}} for p in ("pp", "flap")],
                    "ratios": [0.2],
                    "reference_ratio": 0.2,
                    "baseline": "flpa",
                },
            ),
            _set("methods", []),
        ),
        "evaluation.frontier.baseline: 'flpa' is not one of the frontier's methods (pp, flap)",
    ),
    Case(
        "ablate-points-is-file",
        "ablate",
        _points_is_file,
        "sweep-out/points: is a file, not a folder; ppf ablate keeps every finished point in this folder",
    ),
    # --- late checks moved before the model load (part 5)
    Case(
        "ratio-inflates-to-1",
        "run",
        _set("methods.0.pruning.ratio", 0.9),
        "methods[0].pruning.ratio: 0.9 inflates to a per-layer ratio of 1.2 >= 1",
    ),
    Case(
        "default-skip-inflates-to-1",
        "run",
        _set("methods.0.pruning", {"ratio": 0.4}),
        "methods[0].pruning.ratio: 0.4 inflates to a per-layer ratio of 1.6",
    ),
    Case(
        "skip-layer-out-of-range",
        "run",
        _set("methods.1.pruning.skip_layers", [0, 7]),
        "methods[1].pruning.skip_layers: [7] out of range for a 4-layer model",
    ),
    Case(
        "all-layers-skipped",
        "run",
        _set("methods.0.pruning.skip_layers", [0, 1, 2, 3]),
        "methods[0].pruning.skip_layers: every one of the 4 layers is skipped",
    ),
    Case(
        "warmup-not-below-max-batches",
        "run",
        _set("data.warmup_batches", 3),
        "data.warmup_batches (3) must be less than data.max_batches (3)",
    ),
    Case(
        "seq-len-beyond-positions-llama",
        "run",
        _set("data.seq_len", 300),
        "data.seq_len: 300 tokens exceed the model's 256 positions",
    ),
    Case("seq-len-beyond-positions-opt", "run", _opt_model(300), "exceed the model's 256 positions"),
    Case(
        "calibration-seq-len-beyond-positions",
        "run",
        _set("calibration.seq_len", 400),
        "calibration.seq_len: 400 tokens exceed the model's 256 positions",
    ),
    Case(
        "calibration-documents-too-short",
        "run",
        _short_calibration_documents,
        "calibration.seq_len: no document of calibration.dataset",
    ),
    Case("too-few-windows", "run", _tiny_text, "no batch is left to score"),
    Case(
        "ablation-variant-inflates-to-1",
        "ablate",
        _variant("heavy", {"pruning": {"ratio": 0.9}}),
        "variants.heavy.pruning.ratio: 0.9 inflates",
    ),
    Case(
        "ablation-grid-point-out-of-range",
        "ablate",
        _set("grid", {"pruning.skip_layers": [[0], [9]]}, target="ablation"),
        "variants.pp at {'pruning.skip_layers': [9]}.pruning.skip_layers: [9] out of range",
    ),
    Case(
        "ablation-base-unknown-field",
        "ablate",
        _args("--set", "base.data.seqlen=64"),
        "base.data.seqlen: unknown field",
    ),
    # --- undecodable or damaged files (part 6)
    Case("binary-data-file", "run", _data_file(b"\x00\xff\xfe\x81" * 64), "is not UTF-8 text"),
    Case(
        "latin1-data-file",
        "run",
        _data_file("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1")),
        "is not UTF-8",
    ),
    Case(
        "binary-calibration-file",
        "run",
        _data_file(b"\x00\xff\xfe\x81" * 64, "calibration.dataset"),
        "calibration.dataset",
    ),
    Case("binary-config-file", "run", _binary_config, "is not UTF-8 text"),
    Case("model-config-not-json", "run", _model_config("{not json"), "config.json is not valid JSON"),
    Case("model-config-not-mapping", "run", _model_config("[1, 2]"), "must hold a JSON object"),
    Case("truncated-weights", "run", _truncated_weights, "model.safetensors is damaged"),
    Case(
        "model-config-positions-not-int",
        "run",
        _model_config_field("max_position_embeddings", "2048x"),
        "config.json: max_position_embeddings must be a positive whole number, got '2048x'",
    ),
    Case(
        "model-config-layers-float",
        "eval",
        _model_config_field("num_hidden_layers", 4.5),
        "config.json: num_hidden_layers must be a positive whole number, got 4.5",
    ),
    # --- malformed --set values (part 6)
    Case("set-unclosed-list", "run", _args("--set", "note=[unclosed"), "is not valid YAML"),
    Case(
        "set-yaml-tag", "run", _args("--set", "note=!!python/object/apply:os.system [ls]"), "not valid YAML"
    ),
    Case(
        "set-key-under-scalar",
        "run",
        _args("--set", "data.seq_len.x=1"),
        "data.seq_len is a int (32), not a mapping or list",
    ),
    Case("ablate-set-unclosed", "ablate", _args("--set", "base.note=[x"), "is not valid YAML"),
    # --- config validation (part 7)
    Case(
        "empty-targets", "run", _set("methods.0.pruning.targets", []), "methods[0].pruning.targets: is empty"
    ),
    Case(
        "nan-ratio",
        "run",
        _args("--set", "methods.0.pruning.ratio=.nan"),
        "methods[0].pruning.ratio: must be a finite number in [0, 1), got nan",
    ),
    Case(
        "inf-ratio",
        "eval",
        _args("--set", "methods.0.pruning.ratio=.inf"),
        "must be a finite number in [0, 1), got inf",
    ),
    # --- unclear or silent inputs (Reliability III, item 7)
    Case(
        "ablate-set-grid-ratio-out-of-range",
        "ablate",
        _args("--set", "grid.pruning.ratio=[0.2,1.5]"),
        "at {'pruning.ratio': 1.5}: pruning.ratio: must be a finite number in [0, 1), got 1.5",
    ),
    Case("eval-limit-zero", "eval", _args("--limit", "0"), "--limit: must be a whole number >= 1, got 0"),
    Case(
        "ratio-boolean",
        "run",
        _set("methods.0.pruning.ratio", False),
        "methods[0].pruning.ratio: must be a number in [0, 1), not a boolean (False)",
    ),
    Case("run-out-empty", "run", _args("--out", ""), "--out: is empty"),
    Case("eval-out-empty", "eval", _args("--out", ""), "--out: is empty"),
    Case("ablate-out-empty", "ablate", _args("--out", ""), "--out: is empty"),
    Case("generate-out-empty", "generate", _args("--out", "", "--prompt", "Hello"), "--out: is empty"),
    Case(
        "round-to-beyond-mlp-width",
        "run",
        _set("methods.0.pruning.round_to", 256),
        "methods[0].pruning.round_to: 256 rounds the kept MLP width of every layer up to all 128 units",
    ),
    Case(
        "frontier-method-with-own-ratio",
        "eval",
        _both(
            _set(
                "evaluation.frontier",
                {
                    "methods": ["pp", {"preset": "flap", "pruning": {"ratio": 0.3, "skip_layers": [0]}}],
                    "ratios": [0.2],
                    "reference_ratio": 0.2,
                },
            ),
            _set("methods", []),
        ),
        "evaluation.frontier.methods[1].pruning.ratio: 0.3 would be replaced by each of "
        "evaluation.frontier.ratios [0.2]",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(
    case: Case, env: Env, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    if case.before_model_load:
        request.getfixturevalue("no_model_load")
    extra = case.mutate(env)
    if case.id == "binary-config-file":
        config = env.tmp / "run.yaml"
        code = cli.main(["run", str(config), "--no-progress", *extra])
        captured = capsys.readouterr()
        out, err = captured.out, captured.err
    else:
        code, out, err = invoke(env, case.command, extra, capsys)
    assert code == case.exit_code, err
    error = err[err.index("error: ") :] if "error: " in err else ""  # saving a tiny model may print first
    assert error, err
    assert case.expected in error, err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------ ablate --set


def test_ablate_set_accepts_the_help_example(
    env: Env, no_model_load: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """``ppf ablate FILE --set base.data.max_batches=3`` is accepted (it reaches the model load)."""
    with pytest.raises(AssertionError, match="a model was loaded"):
        invoke(env, "ablate", ["--set", "base.data.max_batches=4"], capsys)
    plan = load_ablation(env.tmp / "ablate.yaml", ["base.data.max_batches=4", "base.seed=3"])
    assert plan.run.data.max_batches == 4 and plan.run.seed == 3
    assert [m.label for m in plan.run.methods] == ["pp 20%", "random-probe 20%", "pp 40%", "random-probe 40%"]


def test_ablation_variants_carry_their_own_description(env: Env) -> None:
    env.ablation["variants"]["flap"] = "flap"
    plan = load_ablation(env.ablation)
    by_variant = {p.variant: p.method for p in plan.points}
    assert by_variant["flap"].description.startswith("FLAP (static baseline)")
    random_probe = by_variant["random-probe"].description
    assert random_probe.startswith("Probe Pruning") and "strategies.select_probe=random" in random_probe
    plain = by_variant["pp"].description
    assert plain.startswith("Probe Pruning") and "Base method with" not in plain


def test_too_few_windows_message_names_real_fields() -> None:
    from ppframework.data import batched

    with pytest.raises(ConfigError) as info:
        batched(torch.zeros(3, 8, dtype=torch.long), 4)
    assert "n_windows" not in str(info.value) and "data.batch_size" in str(info.value)


# ------------------------------------------------------------------------------------------ runs


def _strict_json(path: Path) -> dict[str, Any]:
    def refuse(token: str) -> Any:
        raise AssertionError(f"non-standard JSON constant {token} in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_failed_method_is_recorded_and_the_others_run(
    env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = ppframework.runner.session.build_pipeline

    def flaky(model: Any, cfg: Any, *, method_index: int = 0, **kwargs: Any) -> Any:
        if method_index == 0:
            raise RuntimeError("strategy exploded")
        return real(model, cfg, method_index=method_index, **kwargs)

    monkeypatch.setattr(ppframework.runner.session, "build_pipeline", flaky)
    out = env.tmp / "out"
    code, stdout, err = invoke(env, "run", ["--out", str(out)], capsys)
    assert code == 1
    assert "pp 40%" in err and "failed" in err
    assert "| pp 40% | 0.40 | - | - | FAILED |" in stdout
    assert "FAILED pp 40%: RuntimeError: strategy exploded" in stdout
    report = _strict_json(out / "results.json")
    rows = {row["method"]: row for row in report["rows"]}
    assert list(rows) == ["dense", "pp 40%", "flap 20%"]
    assert rows["pp 40%"]["error"] == "RuntimeError: strategy exploded"
    assert rows["pp 40%"]["perplexity"] is None
    assert rows["flap 20%"]["error"] is None and rows["flap 20%"]["perplexity"] > 1
    assert report["complete"] is True and report["failed"] == ["pp 40%"]
    assert "FAILED" in (out / "results.md").read_text()


def test_failed_variant_keeps_the_ablation(
    env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = ppframework.runner.session.evaluate_perplexity

    def flaky(model: Any, batches: Any, *, desc: str = "", **kwargs: Any) -> Any:
        if desc.startswith("random-probe 40%"):
            raise ValueError("bad probe")
        return real(model, batches, desc=desc, **kwargs)

    monkeypatch.setattr(ppframework.runner.session, "evaluate_perplexity", flaky)
    out = env.tmp / "out"
    code, stdout, _ = invoke(env, "ablate", ["--out", str(out)], capsys)
    assert code == 1
    report = _strict_json(out / "results.json")
    methods = [row["method"] for row in report["rows"]]
    assert methods == ["dense", "pp 20%", "random-probe 20%", "pp 40%", "random-probe 40%"]
    assert [row["method"] for row in report["rows"] if row["error"]] == ["random-probe 40%"]
    assert report["settings"]["ablation"]["points"][3]["label"] == "random-probe 40%"
    assert "FAILED random-probe 40%: ValueError: bad probe" in stdout


def test_partial_results_survive_an_interrupt(
    env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = ppframework.runner.session.build_pipeline

    def interrupted(model: Any, cfg: Any, *, method_index: int = 0, **kwargs: Any) -> Any:
        if method_index == 1:
            raise KeyboardInterrupt
        return real(model, cfg, method_index=method_index, **kwargs)

    monkeypatch.setattr(ppframework.runner.session, "build_pipeline", interrupted)
    out = env.tmp / "out"
    code, _, err = invoke(env, "run", ["--out", str(out)], capsys)
    assert code == 130 and "interrupted" in err
    report = _strict_json(out / "results.json")
    assert [row["method"] for row in report["rows"]] == ["dense", "pp 40%"]
    assert report["complete"] is False
    assert not list(out.glob(".*.tmp"))  # no temporary files left behind


def test_second_run_on_a_locked_out_dir_is_refused(
    env: Env, no_model_load: None, capsys: pytest.CaptureFixture[str]
) -> None:
    out = env.tmp / "out"
    out.mkdir()
    with (out / ".ppf.lock").open("a+") as handle:  # another run holds the folder
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = invoke(env, "run", ["--out", str(out)], capsys)
    assert code == 2
    assert f"another ppf command is writing to {str(out)!r}" in err


def test_eval_prints_the_table_before_writing(
    env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Path:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ppframework.evaluate.writing, "write_json", broken)
    out = env.tmp / "out"
    code, stdout, err = invoke(env, "eval", ["--out", str(out)], capsys)
    assert code == 1
    assert "| dense |" in stdout and "| pp 40% |" in stdout
    assert "could not write the results" in err


def test_eval_results_json_is_strict(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    out = env.tmp / "out"
    env.run["methods"] = [env.run["methods"][0]]
    env.run["evaluation"]["runtime"] = {"enabled": False}
    code, _, err = invoke(env, "eval", ["--out", str(out)], capsys)
    assert code == 0, err
    report = _strict_json(out / "results.json")
    assert report["rows"][1]["prr"] is None  # PRR divides by 1 - time ratio = 0: inf/NaN -> null


def test_strict_json_maps_non_finite_to_null() -> None:
    from ppframework.outputs import strict_json

    text = strict_json({"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5], "c": (float("nan"),)})
    assert json.loads(text) == {"a": None, "b": [None, None, 1.5], "c": [None]}


# ------------------------------------------------------------------------------------------ calibration cache


@pytest.fixture
def calibration_setup(env: Env) -> tuple[Any, Any, Any]:
    from ppframework.api import load_config
    from ppframework.models import load_model

    cfg = load_config(env.run)
    model, tokenizer = load_model(str(env.model_dir), device="cpu")
    return model, tokenizer, cfg


def _cache_file(cfg: Any) -> Path:
    files = list((Path(cfg.calibration.cache_dir) / "calibration").glob("calib-*.safetensors"))
    assert len(files) == 1
    return files[0]


def _resave(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Rewrite the cache with a valid checksum after ``change`` (as a buggy writer would)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ppframework.calibration import HistoryStore, save_history
    from ppframework.history import BlockHistory
    from ppframework.types import BlockKind

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["header"])
    change(tensors)
    blocks: dict[Any, BlockHistory] = {}
    for name, tensor in tensors.items():
        layer, kind, which = name.split(".")
        hist = blocks.setdefault((int(layer), BlockKind(kind)), BlockHistory(torch.empty(0)))
        setattr(hist, which, tensor)
    for key in ("format", "checksum", "shapes"):
        header.pop(key)
    save_history(HistoryStore(blocks), path, header)


def _nan(tensors: dict[str, torch.Tensor]) -> None:
    tensors["1.mlp.sq_mean"][3, 5] = float("nan")


def _zeros(tensors: dict[str, torch.Tensor]) -> None:
    tensors["2.attention.sq_mean"].zero_()


def _missing_layer(tensors: dict[str, torch.Tensor]) -> None:
    for name in [n for n in tensors if n.startswith("3.")]:
        del tensors[name]


def _wrong_channels(tensors: dict[str, torch.Tensor]) -> None:
    for name in list(tensors):
        tensors[name] = tensors[name][:, :-8].contiguous()


DAMAGE: dict[str, Callable[[Path], None]] = {
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "random-bytes": lambda p: p.write_bytes(bytes(range(256)) * 40),
    "edited-without-checksum": lambda p: p.write_bytes(p.read_bytes()[:-4] + b"\x00\x00\xc0\x7f"),
    "nan": lambda p: _resave(p, _nan),
    "zeros": lambda p: _resave(p, _zeros),
    "missing-layer": lambda p: _resave(p, _missing_layer),
    "wrong-channels": lambda p: _resave(p, _wrong_channels),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_calibration_cache_is_discarded_and_recomputed(
    damage: str, calibration_setup: tuple[Any, Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    from ppframework.api import calibration_history

    model, tokenizer, cfg = calibration_setup
    first, info = calibration_history(model, tokenizer, cfg, progress=False)
    assert info["from_cache"] is False
    path = _cache_file(cfg)
    DAMAGE[damage](path)
    with caplog.at_level(logging.WARNING, logger="ppframework.calibration"):
        second, info = calibration_history(model, tokenizer, cfg, progress=False)
    assert info["from_cache"] is False
    assert str(path) in caplog.text and "discarding it and recomputing" in caplog.text
    for key, hist in first.blocks.items():
        torch.testing.assert_close(second.blocks[key].sq_mean, hist.sq_mean)
    third, info = calibration_history(model, tokenizer, cfg, progress=False)  # rewritten, valid again
    assert info["from_cache"] is True and set(third.blocks) == set(first.blocks)


def test_unwritable_calibration_cache_warns_and_continues(
    calibration_setup: tuple[Any, Any, Any], env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    from ppframework.api import calibration_history

    model, tokenizer, cfg = calibration_setup
    cfg.calibration.cache_dir = str(env.file("cache-is-a-file", "x"))
    with caplog.at_level(logging.WARNING, logger="ppframework.calibration"):
        store, info = calibration_history(model, tokenizer, cfg, progress=False)
    assert info["cache_file"] is None and store.blocks
    assert "continuing without caching" in caplog.text


def test_ppf_cache_dir_pointing_at_a_file_does_not_abort_the_run(
    env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PPF_CACHE_DIR", str(env.file("cache-file", "x")))
    del env.run["calibration"]["cache_dir"]
    env.run["methods"] = [env.run["methods"][0]]
    code, stdout, err = invoke(env, "run", ["--out", str(env.tmp / "out")], capsys)
    assert code == 0, err
    assert "| pp 40% |" in stdout
    report = _strict_json(env.tmp / "out" / "results.json")
    assert report["calibration"]["cache_file"] is None


def test_calibration_cache_key_includes_the_data_folder(tmp_path: Path, env: Env) -> None:
    from ppframework.data import dataset_source

    keys = []
    for name in ("one", "two"):
        folder = tmp_path / name / "wikitext-2-raw-v1"
        folder.mkdir(parents=True)
        (folder / "wiki.test.raw").write_text(f"text of folder {name}\n")
        keys.append(dataset_source("wikitext2", "test", tmp_path / name))
    assert keys[0] != keys[1] and all(str(tmp_path) in k for k in keys)


def test_cache_load_checks_shapes_against_the_model(calibration_setup: tuple[Any, Any, Any]) -> None:
    from ppframework.adapters import get_adapter
    from ppframework.api import calibration_history
    from ppframework.calibration import CacheError, expected_shapes, load_history

    model, tokenizer, cfg = calibration_setup
    calibration_history(model, tokenizer, cfg, progress=False)
    path = _cache_file(cfg)
    expected = expected_shapes(get_adapter(model), cfg.calibration_seq_len)
    store = load_history(path, expected)
    assert store.max_positions == SEQ_LEN and len(store.blocks) == 2 * len(expected["layers"])
    assert all(math.isfinite(float(h.sq_mean.sum())) for h in store.blocks.values())
    with pytest.raises(CacheError, match="this model needs"):
        load_history(path, {**expected, "positions": SEQ_LEN * 2})


def test_a_bad_config_leaves_no_output_folder(
    env: Env, no_model_load: None, capsys: pytest.CaptureFixture[str]
) -> None:
    env.run["methods"][0]["pruning"]["skip_layers"] = [9]
    out = env.tmp / "new-out"
    code, _, err = invoke(env, "run", ["--out", str(out)], capsys)
    assert code == 2 and "skip_layers" in err
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_read_only_out_dir_fails_before_the_model_loads(
    env: Env, no_model_load: None, capsys: pytest.CaptureFixture[str]
) -> None:
    out = env.tmp / "read-only"
    out.mkdir()
    out.chmod(0o555)
    try:
        code, _, err = invoke(env, "eval", ["--out", str(out)], capsys)
    finally:
        out.chmod(0o755)
    assert code == 2 and "is not writable" in err


# -------------------------------------------------------------------------------- unmeasured figures


def _table_row(table: str, method: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith((f"| {method} |", f"| {method} (")))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_eval_without_runtime_shows_no_time_figures(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    """``evaluation.runtime.enabled: false``: no time ratio, IQR, PRR or plot point is made up."""
    out = env.tmp / "eval-out"
    env.run["evaluation"] = {"zeroshot": {"enabled": False}, "runtime": {"enabled": False}, "plot": True}
    code, stdout, err = invoke(env, "eval", ["--out", str(out)], capsys)
    assert code == 0, err
    rows = json.loads((out / "results.json").read_text())["rows"]
    for row in rows:
        assert row["time_ratio"] is None and row["time_ratio_spread"] is None, row
        assert row["decoder_time_ratio"] is None and row["prr"] is None, row
    header = _table_row(stdout, "method")
    cells = _table_row(stdout, "pp 40%")
    for column in ("time ratio (IQR)", "decoder time ratio", "PRR"):
        assert cells[header.index(column)] == "-", (column, cells)
    assert "not faster" not in stdout and "1.000 (0.000)" not in stdout
    assert not (out / "perplexity_vs_runtime.png").exists()
    # what was measured stays: perplexity, realised ratios, FLOPs
    assert rows[1]["perplexity"] is not None and rows[1]["realised_ratio_model"] > 0
    assert rows[1]["ideal_time_ratio"] < 1
    # nothing measured at all: no realised ratio, no FLOPs-ideal ratio (not 0.000 and 1.000)
    blank = ppframework.evaluate.EvalRow("pp 40%", 0.4)
    assert blank.realised_ratio is None and blank.realised_ratio_model is None
    assert blank.ideal_time_ratio is None and blank.time_ratio is None


def test_run_table_flags_a_time_ratio_below_the_flops_ideal(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    out = env.tmp / "run-out"
    code, stdout, err = invoke(env, "run", ["--out", str(out)], capsys)
    assert code == 0, err
    assert "time ratio (1 sequential pass)" in stdout and "timed once, one after another" in stdout
    data = json.loads((out / "results.json").read_text())
    assert all(isinstance(row.get("time_below_ideal"), bool) for row in data["rows"])
    rows = [
        ppframework.runner.results.row_from_json({k: v for k, v in row.items() if k != "time_below_ideal"})
        for row in data["rows"]
    ]
    rows[1].time_ratio = rows[1].ideal_time_ratio - 0.15  # faster than its FLOPs allow
    rows[2].time_ratio = 1.0
    settings, calibration, environment = data["settings"], data["calibration"], data["environment"]
    report = ppframework.runner.RunReport(rows, settings, calibration, environment, 0.0)
    table = ppframework.runner.format_table(report)
    header, cells = _table_row(table, "method"), _table_row(table, rows[1].method)
    assert cells[header.index("time ratio (1 sequential pass)")] == f"{rows[1].time_ratio:.3f} (!)"
    assert "(!) below the FLOPs ideal: noise, not a result" in table
    assert "(!)" not in _table_row(table, rows[2].method)[header.index("time ratio (1 sequential pass)")]
    flags = [row["time_below_ideal"] for row in report.to_json()["rows"]]
    assert flags == [False, True, False]
