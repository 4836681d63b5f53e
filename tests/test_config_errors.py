"""Bad configs fail with a ConfigError naming the field and the valid choices, before any model loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

import ppframework.models
import ppframework.runner
import ppframework.runner.session
from ppframework import cli
from ppframework.api import load_config, load_eval_text
from ppframework.config import PRESETS, RunConfig, apply_overrides
from ppframework.errors import ConfigError


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to load a model fails the test."""

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a model was loaded ({args}, {kwargs}) before the bad input was reported")

    monkeypatch.setattr(ppframework.runner.session, "load_model", forbidden)
    monkeypatch.setattr(ppframework.models.loading, "load_model", forbidden)


@pytest.fixture
def base(tiny_text_file: Path, tmp_path: Path, tiny_model_dir: Any) -> dict[str, Any]:
    """A valid raw config on a tiny 4-layer model (whose weights these tests never load)."""
    return {
        "model": {"name": str(tiny_model_dir("llama")), "device": "cpu"},
        "data": {"name": str(tiny_text_file), "seq_len": 32, "batch_size": 4, "max_batches": 3},
        "calibration": {"dataset": str(tiny_text_file), "n_samples": 8, "cache_dir": str(tmp_path / "c")},
        "methods": [{"preset": "pp", "pruning": {"ratio": 0.4, "skip_layers": [0]}}],
    }


def with_changes(raw: dict[str, Any], *overrides: str) -> dict[str, Any]:
    return apply_overrides(raw, list(overrides))


def failure(raw: dict[str, Any], overrides: list[str] | None = None) -> str:
    """Validate ``raw`` and run it (model loading forbidden); return the ConfigError's message."""
    with pytest.raises(ConfigError) as info:
        cfg = load_config(raw, overrides)
        ppframework.runner.run(cfg, progress=False)
    return str(info.value)


def test_base_config_is_valid(base: dict[str, Any], no_model_load: None) -> None:
    cfg = load_config(base)
    load_eval_text(cfg)
    with pytest.raises(AssertionError, match="a model was loaded"):
        ppframework.runner.run(cfg, progress=False)


# -------------------------------------------------------------------------------------- strategies


def test_unknown_strategy_name(base: dict[str, Any], no_model_load: None) -> None:
    message = failure(with_changes(base, "methods.0.strategies.select_probe.name=nope"))
    assert "methods[0].strategies.select_probe.name" in message
    assert "'nope'" in message and "residual" in message


def test_unknown_strategy_in_second_method(base: dict[str, Any], no_model_load: None) -> None:
    raw = {**base, "methods": ["pp", {"preset": "dense", "strategies": {"infer": {"name": "warp"}}}]}
    message = failure(raw)
    assert "methods[1].strategies.infer.name" in message
    assert "sliced" in message


def test_parameters_for_a_strategy_without_parameters(base: dict[str, Any], no_model_load: None) -> None:
    message = failure(with_changes(base, "methods.0.strategies.score_channels.params.alpha=1"))
    assert "methods[0].strategies.score_channels.params" in message and "alpha" in message


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5, float("nan"), float("inf")])
def test_bad_pruning_ratio(base: dict[str, Any], no_model_load: None, ratio: float) -> None:
    message = failure(with_changes(base, f"methods.0.pruning.ratio={ratio}"))
    assert message.startswith("methods[0].pruning.ratio:")
    assert f"must be a finite number in [0, 1), got {ratio}" in message


@pytest.mark.parametrize(
    ("field", "value"),
    [("seq_ratio", 0), ("seq_ratio", 1.5), ("batch_ratio", 0), ("batch_ratio", 1.5)],
)
def test_bad_probe_ratio(base: dict[str, Any], no_model_load: None, field: str, value: float) -> None:
    message = failure(with_changes(base, f"methods.0.strategies.select_probe.params.{field}={value}"))
    assert f"methods[0].strategies.select_probe.params.{field}" in message
    assert ("greater than 0" in message) if value == 0 else ("less than or equal to 1" in message)


def test_unknown_probe_parameter(base: dict[str, Any], no_model_load: None) -> None:
    message = failure(with_changes(base, "methods.0.strategies.select_probe.params.seq_ration=0.3"))
    assert "methods[0].strategies.select_probe.params.seq_ration" in message


# -------------------------------------------------------------------------------------- fields


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("bogus=1", "bogus"),
        ("data.seqlen=64", "data.seqlen"),
        ("methods.0.pruning.ratoi=0.2", "methods[0].pruning.ratoi"),
        ("methods.0.history.momentun=0.9", "methods[0].history.momentun"),
    ],
)
def test_unknown_field(base: dict[str, Any], no_model_load: None, override: str, field: str) -> None:
    message = failure(with_changes(base, override))
    assert message.startswith(f"{field}: unknown field")


def test_unknown_preset(base: dict[str, Any], no_model_load: None) -> None:
    message = failure({**base, "methods": [{"preset": "probe-pruning"}]})
    assert message.startswith("methods[0]")
    assert "unknown preset 'probe-pruning'" in message
    assert "pp" in message and "dense" in message


def test_unknown_preset_shorthand(base: dict[str, Any], no_model_load: None) -> None:
    message = failure({**base, "methods": ["pp", "sparsegpt"]})
    assert message.startswith("methods[1]") and "sparsegpt" in message
    assert "wanda-sp" in message and "flap" in message


def test_unknown_window_policy(base: dict[str, Any], no_model_load: None) -> None:
    message = failure(with_changes(base, "data.window_policy=sliding"))
    assert "data.window_policy" in message
    assert "contiguous" in message and "random" in message


def test_unknown_device(base: dict[str, Any], no_model_load: None) -> None:
    message = failure(with_changes(base, "model.device=tpu"))
    assert "model.device" in message and "cuda:N" in message


def test_duplicate_method_labels(base: dict[str, Any], no_model_load: None) -> None:
    message = failure({**base, "methods": ["pp", "pp"]})
    assert "duplicate method labels" in message and "name" in message


def test_calibration_seq_len_below_data_seq_len(base: dict[str, Any], no_model_load: None) -> None:
    refuse = "methods.0.history.beyond=refuse"
    message = failure(with_changes(base, "calibration.seq_len=16", refuse))
    assert "calibration.seq_len (16)" in message and "data.seq_len (32)" in message
    assert "history.beyond" in message
    # the default (history.beyond: extend) extends the history past its positions instead
    assert load_config(with_changes(base, "calibration.seq_len=16")).calibration_seq_len == 16
    # equal and longer are fine
    assert load_config(with_changes(base, "calibration.seq_len=32")).calibration_seq_len == 32
    assert load_config(with_changes(base, "calibration.seq_len=64")).calibration_seq_len == 64


# -------------------------------------------------------------------------------------- data


def test_missing_data_file(base: dict[str, Any], no_model_load: None, tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    message = failure(with_changes(base, f"data.name={missing}"))
    assert message.startswith("data.name:") and str(missing) in message and "existing file" in message


def test_unknown_data_set_name(base: dict[str, Any], no_model_load: None) -> None:
    message = failure(with_changes(base, "data.name=wikitext3"))
    assert message.startswith("data.name:") and "wikitext3" in message
    assert "wikitext2" in message and "c4" in message


def test_missing_data_dir(base: dict[str, Any], no_model_load: None, tmp_path: Path) -> None:
    message = failure(with_changes(base, f"data.data_dir={tmp_path / 'nowhere'}"))
    assert message.startswith("data.data_dir:")


def test_missing_calibration_file(base: dict[str, Any], no_model_load: None, tmp_path: Path) -> None:
    message = failure(with_changes(base, f"calibration.dataset={tmp_path / 'missing.txt'}"))
    assert "calibration.dataset" in message


def test_unknown_calibration_data_set(base: dict[str, Any], no_model_load: None) -> None:
    message = failure(with_changes(base, "calibration.dataset=c5"))
    assert "calibration.dataset" in message and "c4" in message


def test_unsupported_data_file_extension(base: dict[str, Any], no_model_load: None, tmp_path: Path) -> None:
    csv = tmp_path / "table.csv"
    csv.write_text("text\nhello world\n")
    message = failure(with_changes(base, f"data.name={csv}"))
    assert "data.name" in message and ".txt" in message


# -------------------------------------------------------------------------------------- model family


def test_unsupported_model_family() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from ppframework.adapters import get_adapter

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ConfigError) as info:
        get_adapter(model)
    message = str(info.value)
    assert message.startswith("model.name:") and "'gpt2'" in message
    assert "llama" in message and "opt" in message


# -------------------------------------------------------------------------------------- --set


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("methods.0.pruning.ratio", "expected KEY=VALUE"),
        ("=0.2", "empty key"),
        ("methods.3.pruning.ratio=0.2", "'3' is not an index of a list of 1"),
        ("methods.x.pruning.ratio=0.2", "'x' is not an index of a list of 1"),
        ("methods.0.pruning.skip_layers.7=1", "'7' is not an index of a list of 1"),
    ],
)
def test_bad_set_syntax(base: dict[str, Any], override: str, expected: str, no_model_load: None) -> None:
    message = failure(base, [override])
    assert message.startswith(f"--set {override!r}: ")
    assert expected in message


def test_set_overrides_apply(base: dict[str, Any]) -> None:
    cfg = load_config(
        base,
        [
            "methods.0.pruning.ratio=0.2",
            "data.seq_len=64",
            "methods.0.pruning.skip_layers=[0, 3]",
            "methods.0.strategies.select_probe.params.seq_ratio=0.25",
            "calibration.n_samples=16",
            "model.dtype=bfloat16",
            "note=hello world",
        ],
    )
    method = cfg.methods[0]
    assert method.pruning.ratio == 0.2
    assert method.label == "pp 20%"
    assert cfg.data.seq_len == 64 and cfg.calibration_seq_len == 64
    assert method.pruning.skip_layers == [0, 3]
    assert method.strategies.select_probe.params == {"seq_ratio": 0.25, "batch_ratio": 0.05}
    assert cfg.calibration.n_samples == 16
    assert cfg.model.dtype == "bfloat16"
    assert cfg.note == "hello world"
    assert base["methods"][0]["pruning"]["ratio"] == 0.4  # the raw dict is not modified


def test_set_method_ratio_on_default_methods() -> None:
    cfg = load_config({}, ["methods.0.pruning.ratio=0.2"])
    assert cfg.methods[0].pruning.ratio == 0.2


# -------------------------------------------------------------------------------------- files, presets


def test_yaml_and_json_files_load_the_same(base: dict[str, Any], tmp_path: Path) -> None:
    yaml_file = tmp_path / "run.yaml"
    json_file = tmp_path / "run.json"
    yaml_file.write_text(yaml.safe_dump(base))
    json_file.write_text(json.dumps(base))
    from_yaml, from_json = load_config(yaml_file), load_config(str(json_file))
    assert isinstance(from_yaml, RunConfig)
    assert from_yaml.model_dump() == from_json.model_dump() == load_config(base).model_dump()
    assert from_yaml.data.seq_len == 32 and from_yaml.methods[0].preset == "pp"


def test_config_file_with_overrides(base: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "run.yml"
    path.write_text(yaml.safe_dump(base))
    cfg = load_config(path, ["methods.0.pruning.ratio=0.2", "data.seq_len=64"])
    assert cfg.methods[0].pruning.ratio == 0.2 and cfg.data.seq_len == 64


def test_the_default_yaml_loads() -> None:
    path = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
    cfg = load_config(path)
    assert cfg.methods[0].preset == "pp" and cfg.methods[0].pruning.ratio == 0.4


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("bad.yaml", "model: [unclosed", "is not valid YAML"),
        ("bad.json", "{'model': 1}", "is not valid JSON"),
        ("list.yaml", "- pp\n- dense\n", "must hold a mapping at the top level, not list"),
    ],
)
def test_unreadable_config_file(tmp_path: Path, name: str, text: str, expected: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_empty_config_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    cfg = load_config(path)
    assert cfg.model.name == "smollm2-135m" and [m.preset for m in cfg.methods] == ["pp"]


def test_pp_preset_has_paper_defaults() -> None:
    method = load_config({"methods": [{"preset": "pp"}]}).methods[0]
    assert method.name == "pp" and method.label == "pp 40%"
    assert method.pruning.ratio == 0.4
    assert method.pruning.skip_layers == [0, 1, 2]
    assert method.pruning.targets == ["attention", "mlp"]
    strategies = method.strategies
    assert strategies.select_probe.name == "residual"
    assert strategies.select_probe.params == {"seq_ratio": 0.5, "batch_ratio": 0.05}
    assert strategies.score_channels.name == "ppsp"
    assert strategies.fuse_history.name == "importance-scaled"
    assert strategies.apply_mask.name == "structured"
    assert strategies.infer.name == "sliced"
    assert (method.history.init, method.history.update, method.history.momentum) == (
        "calibration",
        "ema",
        0.99,
    )


def test_dense_preset_and_preset_merge() -> None:
    dense, custom = load_config(
        {
            "methods": [
                "dense",
                {
                    "preset": "pp",
                    "name": "pp-q",
                    "strategies": {"select_probe": {"params": {"seq_ratio": 0.25}}},
                },
            ]
        }
    ).methods
    assert dense.pruning.ratio == 0.0 and dense.history.init == "none"
    # a partial override of a preset keeps the rest of the preset
    assert custom.strategies.select_probe.name == "residual"
    assert custom.strategies.select_probe.params == {"seq_ratio": 0.25, "batch_ratio": 0.05}
    assert custom.label == "pp-q 40%"
    assert PRESETS["pp"]["strategies"]["select_probe"]["params"]["seq_ratio"] == 0.5  # preset untouched


# -------------------------------------------------------------------------------------- CLI


def _write(tmp_path: Path, raw: dict[str, Any]) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("methods.0.pruning.ratio=1.0", "methods[0].pruning.ratio"),
        ("methods.0.strategies.select_probe.name=nope", "registered: full, none, random, residual"),
        ("data.name=wikitext3", "data.name: 'wikitext3' is neither a known data set"),
    ],
)
def test_cli_bad_config_exits_2(
    base: dict[str, Any],
    tmp_path: Path,
    no_model_load: None,
    capsys: pytest.CaptureFixture[str],
    override: str,
    expected: str,
) -> None:
    config = _write(tmp_path, with_changes(base, override))
    code = cli.main(["run", config, "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("error: ") and expected in captured.err
    assert captured.out == ""


def test_cli_bad_set_exits_2(
    base: dict[str, Any], tmp_path: Path, no_model_load: None, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["run", _write(tmp_path, base), "--set", "data.seq_len", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2
    assert "error: --set 'data.seq_len': expected KEY=VALUE" in captured.err


def test_cli_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_missing_model_exits_2(
    base: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _write(tmp_path, with_changes(base, f"model.name={tmp_path / 'no' / 'such' / 'model'}"))
    code = cli.main(["run", config, "--no-progress"])
    assert code == 2
    assert "error: model.name=" in capsys.readouterr().err
