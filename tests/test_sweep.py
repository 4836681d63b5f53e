"""Sweeps: the point store (resume, --rerun, failed points) and ``ppf ablate --launcher ray``.

The Ray tests start a local cluster inside the test session (``ray.init(num_cpus=2)``) and use the
tiny random LLaMA-like model; they are skipped when Ray is not installed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st

import ppframework.runner
import ppframework.runner.session
from ppframework import cli
from ppframework.ablation import WorkerResources, load_ablation
from ppframework.errors import ConfigError
from ppframework.runner.points import POINTS_FOLDER, PointKeys, PointStore, settings_key

SEQ_LEN = 32


def _ablation(model_dir: Path, text_file: Path, cache: Path) -> dict[str, Any]:
    return {
        "description": "tiny sweep",
        "base": {
            "model": {"name": str(model_dir), "device": "cpu"},
            "data": {
                "name": str(text_file),
                "seq_len": SEQ_LEN,
                "batch_size": 4,
                "max_batches": 3,
                "window_policy": "contiguous",
            },
            "calibration": {
                "dataset": str(text_file),
                "n_samples": 8,
                "batch_size": 4,
                "cache_dir": str(cache),
            },
            "method": {"preset": "pp", "pruning": {"skip_layers": [0]}},
        },
        "variants": {
            "pp": {},
            "random-probe": {"strategies": {"select_probe": "random"}},
            "wanda-sp": "wanda-sp",
        },
        "grid": {"pruning.ratio": [0.2, 0.4]},
    }


@pytest.fixture
def sweep_file(tmp_path: Path, tiny_model_dir: Any, tiny_text_file: Path, isolated_cache: Path) -> Path:
    path = tmp_path / "sweep.yaml"
    data = _ablation(tiny_model_dir("llama"), tiny_text_file, tmp_path / "calibration-cache")
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _ablate(path: Path, out: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    code = cli.main(["ablate", str(path), "--out", str(out), "--no-progress", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _results(out: Path) -> dict[str, Any]:
    return json.loads((out / "results.json").read_text())


def _quality(report: dict[str, Any]) -> list[tuple[Any, ...]]:
    """What must not depend on the launcher: every row's label, ratios, perplexity and error."""
    keys = (
        "method",
        "target_ratio",
        "layer_ratio",
        "realised_ratio",
        "realised_ratio_model",
        "perplexity",
        "delta_perplexity",
        "probe_flops_share",
        "ideal_time_ratio",
        "static",
        "error",
    )
    return [tuple(row[k] for k in keys) for row in report["rows"]]


def _count_evaluations(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = ppframework.runner.session.evaluate_perplexity

    def counting(model: Any, batches: Any, *, desc: str = "", **kwargs: Any) -> Any:
        calls.append(desc)
        return real(model, batches, desc=desc, **kwargs)

    monkeypatch.setattr(ppframework.runner.session, "evaluate_perplexity", counting)
    return calls


def _fail_at(monkeypatch: pytest.MonkeyPatch, label: str, error: BaseException) -> Any:
    """Make the evaluation of ``label`` raise ``error``; return the real evaluation function."""
    real = ppframework.runner.session.evaluate_perplexity

    def failing(model: Any, batches: Any, *, desc: str = "", **kwargs: Any) -> Any:
        if desc == label:
            raise error
        return real(model, batches, desc=desc, **kwargs)

    monkeypatch.setattr(ppframework.runner.session, "evaluate_perplexity", failing)
    return real


# ------------------------------------------------------------------------------------------ keys


def test_point_keys_follow_the_settings_that_decide_results(sweep_file: Path, tmp_path: Path) -> None:
    plan = load_ablation(sweep_file)
    keys = PointKeys.of(plan.run)
    assert len(set(keys.methods + [keys.dense])) == 1 + len(plan.run.methods)
    same = plan.run.model_copy(deep=True)
    same.out_dir, same.progress, same.note = str(tmp_path / "elsewhere"), False, "a note"
    same.calibration.cache_dir = str(tmp_path / "other-cache")
    assert PointKeys.of(same) == keys
    for override in ("base.seed=1", "base.data.seq_len=16", "base.calibration.n_samples=4"):
        changed = PointKeys.of(load_ablation(sweep_file, [override]).run)
        assert changed.dense != keys.dense and not set(changed.methods) & set(keys.methods), override
    # a change to one method only moves that method's key
    other = load_ablation(sweep_file, ["variants.random-probe.strategies.select_probe=variance"]).run
    moved = [a != b for a, b in zip(PointKeys.of(other).methods, keys.methods, strict=True)]
    assert moved == [label.startswith("random-probe") for label in (m.label for m in plan.run.methods)]


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=10,
)


@given(st.dictionaries(st.text(max_size=5), _json_values, max_size=6), st.randoms())
def test_settings_key_ignores_key_order_and_sees_every_value(settings: dict[str, Any], rng: Any) -> None:
    items = list(settings.items())
    rng.shuffle(items)
    assert settings_key(dict(items)) == settings_key(settings)
    changed = {**settings, "__extra__": 1}
    assert settings_key(changed) != settings_key(settings)


def test_settings_key_is_canonical() -> None:
    assert settings_key({"a": 1, "b": [1.0, 2]}) == settings_key({"b": [1.0, 2], "a": 1})
    assert settings_key({"a": 1}) != settings_key({"a": 2})
    assert settings_key({"x": float("nan")}) == settings_key({"x": None})


def test_store_ignores_damaged_and_failed_records(tmp_path: Path) -> None:
    store = PointStore(tmp_path / "points")
    store.save("k1", {"row": {"method": "pp", "error": None}})
    store.save("k2", {"row": {"method": "pp", "error": "RuntimeError: boom"}})
    store.path("k3").write_text("{not json")
    store.save("k4", {"row": {"method": "pp", "error": None}})
    record = json.loads(store.path("k4").read_text())
    store.path("k4").write_text(json.dumps({**record, "key": "other"}))
    assert store.load("k1") is not None and store.load("k1")["row"]["method"] == "pp"
    assert store.load("k2") is None and store.load("k3") is None and store.load("k4") is None
    assert store.load("missing") is None


# ------------------------------------------------------------------------------------------ local resume


def test_rerun_of_a_finished_sweep_runs_nothing(
    sweep_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code, _, _ = _ablate(sweep_file, out, capsys)
    assert code == 0
    first = _results(out)
    assert len(list((out / POINTS_FOLDER).glob("*.json"))) == 7
    calls = _count_evaluations(monkeypatch)
    code, stdout, _ = _ablate(sweep_file, out, capsys)
    assert code == 0 and calls == []
    assert "reused 7 finished point(s)" in stdout
    second = _results(out)
    assert _quality(second) == _quality(first)
    assert [r["time_ratio"] for r in second["rows"]] == [r["time_ratio"] for r in first["rows"]]
    assert second["sweep"]["resumed"] == [row["method"] for row in first["rows"]]
    assert second["calibration"] == first["calibration"]
    # --rerun runs every point again
    code, stdout, _ = _ablate(sweep_file, out, capsys, "--rerun")
    assert code == 0 and len(calls) == 7 and "reused" not in stdout
    assert _quality(_results(out)) == _quality(first)


def test_a_crashed_sweep_resumes_where_it_stopped(
    sweep_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    real = _fail_at(monkeypatch, "pp 40%", KeyboardInterrupt())
    code, _, _ = _ablate(sweep_file, out, capsys)
    assert code == 130
    partial = _results(out)
    assert [r["method"] for r in partial["rows"]] == ["dense", "pp 20%", "random-probe 20%", "wanda-sp 20%"]
    monkeypatch.setattr(ppframework.runner.session, "evaluate_perplexity", real)
    calls = _count_evaluations(monkeypatch)
    code, stdout, _ = _ablate(sweep_file, out, capsys)
    assert code == 0
    assert calls == ["pp 40%", "random-probe 40%", "wanda-sp 40%"]
    assert "reused 4 finished point(s)" in stdout
    resumed = _results(out)
    assert resumed["complete"] is True and len(resumed["rows"]) == 7
    fresh = tmp_path / "fresh"
    assert _ablate(sweep_file, fresh, capsys)[0] == 0
    assert _quality(resumed) == _quality(_results(fresh))


def test_a_failed_point_is_shown_and_tried_again(
    sweep_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    real = _fail_at(monkeypatch, "wanda-sp 20%", RuntimeError("out of luck"))
    code, stdout, _ = _ablate(sweep_file, out, capsys)
    assert code == 1 and "FAILED wanda-sp 20%: RuntimeError: out of luck" in stdout
    monkeypatch.setattr(ppframework.runner.session, "evaluate_perplexity", real)
    calls = _count_evaluations(monkeypatch)
    code, stdout, _ = _ablate(sweep_file, out, capsys)
    assert code == 0 and calls == ["wanda-sp 20%"] and "FAILED" not in stdout


# (id, the field damaged, damage(stored row) -> damaged row)
DAMAGED_RECORDS: list[tuple[str, str, Any]] = [
    ("perplexity-string", "perplexity", lambda row: {**row, "perplexity": "12.5"}),
    ("time-ratio-list", "time_ratio", lambda row: {**row, "time_ratio": [0.5]}),
    ("static-string", "static", lambda row: {**row, "static": "yes"}),
    ("batch-seconds-strings", "batch_seconds", lambda row: {**row, "batch_seconds": ["fast"]}),
    ("method-missing", "method", lambda row: {k: v for k, v in row.items() if k != "method"}),
    ("unknown-field", "colour", lambda row: {**row, "colour": "blue"}),
]
ONE_RATIO = ("--set", "grid={pruning.ratio: [0.4]}")


@pytest.mark.parametrize(
    ("field", "damage"), [c[1:] for c in DAMAGED_RECORDS], ids=[c[0] for c in DAMAGED_RECORDS]
)
def test_a_damaged_point_record_is_run_again_and_named(
    sweep_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    field: str,
    damage: Any,
) -> None:
    out = tmp_path / "out"
    assert _ablate(sweep_file, out, capsys, *ONE_RATIO)[0] == 0
    first = _results(out)
    key = PointKeys.of(load_ablation(sweep_file, [ONE_RATIO[1]]).run).methods[0]  # pp 40%
    path = PointStore.in_out_dir(out).path(key)
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "row": damage(record["row"])}))
    calls = _count_evaluations(monkeypatch)
    with caplog.at_level("WARNING"):
        code, stdout, err = _ablate(sweep_file, out, capsys, *ONE_RATIO)
    assert code == 0, err
    assert calls == ["pp 40%"]  # the damaged point, and only it, runs again
    warning = next(r.getMessage() for r in caplog.records if str(path) in r.getMessage())
    assert f"row.{field}" in warning and "running the point again" in warning, warning
    second = _results(out)
    assert second["complete"] is True and _quality(second) == _quality(first)
    assert _results(out)["sweep"]["resumed"] == ["dense", "random-probe 40%", "wanda-sp 40%"]
    assert json.loads(path.read_text())["row"]["method"] == "pp 40%"  # stored again, whole


def test_a_complete_results_file_is_never_replaced_by_a_partial_one(
    sweep_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert _ablate(sweep_file, out, capsys, *ONE_RATIO)[0] == 0
    complete = _results(out)
    real = _fail_at(monkeypatch, "random-probe 40%", KeyboardInterrupt())
    code, _, err = _ablate(sweep_file, out, capsys, *ONE_RATIO, "--rerun")
    assert code == 130
    assert _results(out) == complete  # the finished results stay
    partial = json.loads((out / "results.partial.json").read_text())
    assert partial["complete"] is False and [r["method"] for r in partial["rows"]] == ["dense", "pp 40%"]
    assert (out / "results.partial.md").is_file() and (out / "results.partial.csv").is_file()
    monkeypatch.setattr(ppframework.runner.session, "evaluate_perplexity", real)
    assert _ablate(sweep_file, out, capsys, *ONE_RATIO)[0] == 0
    assert _results(out)["complete"] is True and len(_results(out)["rows"]) == 4
    assert not list(out.glob("results.partial.*"))  # a complete report replaces the partial one


def test_rerun_without_out_and_address_without_ray_are_refused(
    sweep_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["ablate", str(sweep_file), "--rerun"]) == 2
    assert "--rerun" in capsys.readouterr().err
    assert cli.main(["ablate", str(sweep_file), "--address", "auto"]) == 2
    assert "--address: only used with --launcher ray" in capsys.readouterr().err


def test_resources_are_validated(sweep_file: Path) -> None:
    with pytest.raises(ConfigError, match="resources.cpus"):
        load_ablation(sweep_file, ["resources.cpus=0"])
    plan = load_ablation(sweep_file, ["resources.cpus=2", "resources.workers=3"])
    assert plan.resources == WorkerResources(cpus=2, workers=3)


def test_launcher_ray_without_ray_says_how_to_install(
    sweep_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    assert cli.main(["ablate", str(sweep_file), "--launcher", "ray"]) == 2
    assert "pip install 'ppframework[ray]'" in capsys.readouterr().err


def test_an_address_nothing_answers_at_is_refused_quickly(sweep_file: Path) -> None:
    """``--address 127.0.0.1:1`` is an error naming --address, not an endless wait (run in a child
    process with a timeout, so a regression fails instead of hanging the suite)."""
    pytest.importorskip("ray")
    command = [sys.executable, "-m", "ppframework.cli", "ablate", str(sweep_file), "--no-progress"]
    command += ["--launcher", "ray", "--address", "127.0.0.1:1"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=20, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("ppf ablate --address 127.0.0.1:1 still waits after 20 s")
    assert done.returncode == 2, done.stderr
    assert "error: --address: could not connect to the cluster at '127.0.0.1:1'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (
            {"memory_gb": 1000},
            "resources.memory_gb: each worker asks for 1000 GiB of memory, but the largest "
            "node of the cluster has 16",
        ),
        (
            {"cpus": 64},
            "resources.cpus: each worker asks for 64 CPU(s), but the largest node of the cluster has 8",
        ),
        (
            {"gpus": 2},
            "resources.gpus: each worker asks for 2 GPU(s), but the largest node of the cluster has 1",
        ),
        ({"cpus": 8, "gpus": 1}, "no single node of the cluster has all of"),
    ],
)
def test_resources_no_node_can_give_are_refused(request_: dict[str, Any], expected: str) -> None:
    from ppframework.sweep.ray_launcher import check_resources_fit

    gib = 2.0**30

    class FakeRay:
        @staticmethod
        def nodes() -> list[dict[str, Any]]:
            return [
                {"Alive": True, "Resources": {"CPU": 8.0, "memory": 16 * gib}},
                {"Alive": True, "Resources": {"CPU": 2.0, "GPU": 1.0, "memory": 4 * gib}},
                {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0, "memory": 2000 * gib}},
            ]

    with pytest.raises(ConfigError, match="Ray would wait") as info:
        check_resources_fit(FakeRay(), WorkerResources(**request_))
    assert expected in str(info.value)
    check_resources_fit(FakeRay(), WorkerResources(cpus=2, gpus=1, memory_gb=4))  # fits the second node


# ------------------------------------------------------------------------------------------ Ray

ray = pytest.importorskip("ray") if os.environ.get("PPF_SKIP_RAY") != "1" else None


@pytest.fixture(scope="module")
def ray_cluster() -> Any:
    if ray is None:
        pytest.skip("PPF_SKIP_RAY=1")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_sweep_equals_local_and_resumes(
    ray_cluster: Any,
    sweep_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the Ray workers (1 CPU each) run on one thread
    try:
        assert _ablate(sweep_file, tmp_path / "local", capsys)[0] == 0
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "ray"
    code, stdout, _ = _ablate(sweep_file, out, capsys, "--launcher", "ray")
    assert code == 0, stdout
    local, remote = _results(tmp_path / "local"), _results(out)
    for a, b in zip(_quality(local), _quality(remote), strict=True):
        assert a[0] == b[0]
        for x, y in zip(a[1:], b[1:], strict=True):
            assert x == y or (isinstance(x, float) and math.isclose(x, y, rel_tol=1e-6)), (a, b)
    assert remote["sweep"]["launcher"] == "ray" and remote["sweep"]["workers"] == 2
    assert remote["calibration"]["n_samples"] == 8
    assert (out / "results.md").read_text().count("| pp 40% |") == 1
    # a re-run runs nothing new: no worker is started
    calls = _count_evaluations(monkeypatch)
    monkeypatch.setattr(ray_cluster, "remote", lambda *a, **k: pytest.fail("a worker was started"))
    code, stdout, _ = _ablate(sweep_file, out, capsys, "--launcher", "ray")
    assert code == 0 and calls == [] and "reused 7 finished point(s)" in stdout
    assert _quality(_results(out)) == _quality(remote)


class _FaultyWorker:
    """Mixed into :class:`PointWorker` by the test below: one point raises, one kills its worker."""

    def method(self, index: int, dense_row: dict[str, Any], calibration: Any) -> Any:
        label = self.session.cfg.methods[index].label  # type: ignore[attr-defined]
        if label == "pp 40%":
            os._exit(3)
        if label != "random-probe 20%":
            return super().method(index, dense_row, calibration)  # type: ignore[misc]
        real = ppframework.runner.session.evaluate_perplexity
        ppframework.runner.session.evaluate_perplexity = _raising  # in this worker, for this point only
        try:
            return super().method(index, dense_row, calibration)  # type: ignore[misc]
        finally:
            ppframework.runner.session.evaluate_perplexity = real


def _raising(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("the point raised")


def test_ray_sweep_records_a_raising_point_and_a_killed_worker(
    ray_cluster: Any, sweep_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ray import cloudpickle  # Ray's own copy pickles the actor class

    from ppframework.sweep.ray_launcher import PointWorker, run_ray

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    faulty = type("FaultyWorker", (_FaultyWorker, PointWorker), {})
    plan = load_ablation(sweep_file)
    cfg = plan.run
    cfg.out_dir = str(tmp_path / "out")
    store = PointStore.in_out_dir(cfg.out_dir)
    try:
        report = run_ray(
            cfg, store=store, progress=False, worker_cls=faulty, resources=WorkerResources(cpus=1, workers=1)
        )
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    errors = {row.method: row.error for row in report.rows}
    assert list(errors) == ["dense"] + [m.label for m in cfg.methods]
    assert errors["random-probe 20%"] == "RuntimeError: the point raised"
    assert errors["pp 40%"] is not None and "worker died" in errors["pp 40%"]
    # the worker that raised went on with the next points; after the killed one a new worker finished
    failed = {"random-probe 20%", "pp 40%"}
    assert all(error is None for label, error in errors.items() if label not in failed)
    assert [row.method for row in report.failures] == ["random-probe 20%", "pp 40%"]
    assert "FAILED pp 40%: " in ppframework.runner.format_table(report)
    assert report.sweep is not None and report.sweep["workers"] == 1


def test_worker_count_follows_the_cluster_and_the_resources() -> None:
    from ppframework.sweep.ray_launcher import worker_count

    class FakeRay:
        def __init__(self, **resources: float) -> None:
            self.resources = resources

        def cluster_resources(self) -> dict[str, float]:
            return self.resources

    gib = 2.0**30
    assert worker_count(FakeRay(CPU=8.0), WorkerResources(cpus=2), pending=10) == 4
    assert worker_count(FakeRay(CPU=8.0), WorkerResources(cpus=2), pending=3) == 3
    assert worker_count(FakeRay(CPU=8.0, GPU=2.0), WorkerResources(gpus=1), pending=10) == 2
    assert worker_count(FakeRay(CPU=8.0, memory=10 * gib), WorkerResources(memory_gb=4), pending=10) == 2
    assert worker_count(FakeRay(CPU=1.0), WorkerResources(cpus=4), pending=10) == 1  # Ray queues it
    assert worker_count(FakeRay(CPU=8.0), WorkerResources(workers=3), pending=10) == 3
    assert worker_count(FakeRay(CPU=8.0), WorkerResources(workers=3), pending=2) == 2
