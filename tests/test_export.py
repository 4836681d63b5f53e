"""Export and reuse (docs/export.md): a static decision as a smaller model, a pipeline's state saved once.

Every family: the exported model's logits equal the attached pipeline's (within 1e-5) and ``generate``
gives the same tokens, for a uniform export (a standard checkpoint where the family's config allows)
and an adaptive one with a skipped layer and FLAP's bias compensation (the per-layer format). A fresh
process loads the standard checkpoints with plain transformers, without importing ppframework.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import ppframework as ppf
from ppframework import cli
from ppframework.adapters import get_adapter
from ppframework.calibration import calibrate
from ppframework.export import ExportError, export_pruned, load_pipeline, load_pruned
from ppframework.export.layout import group_counts, kv_share, kv_slots
from ppframework.pipeline import Pipeline
from ppframework.testing.tiny import FAMILIES, tiny_model, tiny_tokenizer

UNIFORM = {"preset": "wanda-sp", "pruning": {"ratio": 0.5, "skip_layers": []}}
ADAPTIVE = {"preset": "flap", "pruning": {"ratio": 0.4, "skip_layers": [0]}}
#: Families whose config cannot state the pruned widths (the head size is hidden_size / heads).
PER_LAYER_ONLY = {"opt"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _inputs(seed: int = 1, rows: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(4, 100, (rows, length), generator=torch.Generator().manual_seed(seed))


def _pipeline(family: str, method: dict[str, Any], seed: int = 0) -> Pipeline:
    model = tiny_model(family, seed=seed)
    batches = [_inputs(seed=10 + i, rows=4, length=32) for i in range(2)]
    history = calibrate(model, get_adapter(model), batches, progress=False)
    return Pipeline(model, ppf.MethodConfig.model_validate(method), history=history)


def _check_same_model(pipe: Pipeline, exported: torch.nn.Module) -> None:
    x = _inputs()
    with pipe, torch.no_grad():
        expected = pipe.model(x, use_cache=False).logits
        tokens = pipe.model.generate(x, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        got = exported(x, use_cache=False).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert torch.equal(exported.generate(x, max_new_tokens=6, do_sample=False), tokens)


# -- the layout math ------------------------------------------------------------------------------------
def test_kv_slots_share_the_gcd_of_group_counts() -> None:
    heads = torch.tensor([0, 1, 2, 5])  # group size 3: kv 0 serves 3 heads, kv 1 serves 1
    assert group_counts(heads, 3) == {0: 3, 1: 1}
    assert kv_share(group_counts(heads, 3)) == 1
    assert kv_slots(heads, 3, 1) == [0, 0, 0, 1]
    assert kv_slots(torch.tensor([0, 1, 4, 5]), 2, 2) == [0, 2]
    with pytest.raises(ValueError, match="not a multiple"):
        kv_slots(heads, 3, 3)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_every_slot_serves_heads_of_one_group(data: st.DataObject) -> None:
    kv = data.draw(st.integers(1, 4))
    group = data.draw(st.integers(1, 4))
    heads = sorted(data.draw(st.sets(st.integers(0, kv * group - 1), min_size=1)))
    kept = torch.tensor(heads)
    share = kv_share(group_counts(kept, group))
    slots = kv_slots(kept, group, share)
    assert len(slots) * share == len(heads)
    for position, head in enumerate(heads):  # the exported head i reads slot i // share
        assert slots[position // share] == head // group


# -- every family: exported == attached ----------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_export_equals_the_attached_pipeline(family: str, tmp_path: Path) -> None:
    pipe = _pipeline(family, UNIFORM)
    result = export_pruned(pipe, tmp_path / "out", tokenizer=tiny_tokenizer())
    assert result.format == ("per-layer" if family in PER_LAYER_ONLY else "hf"), result.reason
    assert result.parameters < result.source_parameters
    model, tokenizer = load_pruned(tmp_path / "out")
    assert tokenizer is not None
    _check_same_model(pipe, model)


@pytest.mark.parametrize("family", FAMILIES)
def test_adaptive_export_with_bias_compensation_equals_the_attached_pipeline(
    family: str, tmp_path: Path
) -> None:
    pipe = _pipeline(family, ADAPTIVE)
    result = export_pruned(pipe, tmp_path / "out")
    assert result.format == "per-layer"
    assert result.layout.layers[0].num_attention_heads == 4  # the skipped layer keeps everything
    assert any(layer.attention_output_bias for layer in result.layout.layers)
    info = json.loads((tmp_path / "out" / "ppf_layers.json").read_text())
    assert [layer["intermediate_size"] for layer in info["layers"]] == [
        layer.intermediate_size for layer in result.layout.layers
    ]
    model, _ = load_pruned(tmp_path / "out")
    _check_same_model(pipe, model)


def test_standard_checkpoint_loads_in_a_fresh_process_without_ppframework(tmp_path: Path) -> None:
    x = _inputs()
    expected = {}
    for family in (f for f in FAMILIES if f not in PER_LAYER_ONLY):
        pipe = _pipeline(family, UNIFORM)
        export_pruned(pipe, tmp_path / family)
        with pipe, torch.no_grad():
            expected[family] = pipe.model(x, use_cache=False).logits
    torch.save(x, tmp_path / "x.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
x = torch.load({str(tmp_path / "x.pt")!r})
out = {{}}
for family in {sorted(expected)!r}:
    model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + "/" + family)
    with torch.no_grad():
        out[family] = model(x, use_cache=False).logits
assert not any(name.startswith("ppframework") for name in sys.modules), "ppframework was imported"
torch.save(out, {str(tmp_path / "logits.pt")!r})
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = torch.load(tmp_path / "logits.pt")
    for family, logits in expected.items():
        torch.testing.assert_close(got[family], logits, atol=1e-5, rtol=0, msg=family)


# -- formats and refusals ---------------------------------------------------------------------------------
def test_hf_format_refused_with_the_reason_and_the_option(tmp_path: Path) -> None:
    pipe = _pipeline("llama", ADAPTIVE)
    with pytest.raises(ExportError, match=r"format: 'hf' is impossible here: the layers differ.*per-layer"):
        export_pruned(pipe, tmp_path / "out", format="hf")
    assert not (tmp_path / "out").exists()


def test_transformers_config_checks_decide_the_format(tmp_path: Path) -> None:
    # 3 of 4 heads: LLaMA's config insists on hidden_size % heads == 0, so the per-layer format is used.
    pipe = _pipeline("llama", {"preset": "wanda-sp", "pruning": {"ratio": 0.25, "skip_layers": []}})
    result = export_pruned(pipe, tmp_path / "out")
    assert result.format == "per-layer"
    assert "hidden size (64) is not a multiple" in str(result.reason)
    model, _ = load_pruned(tmp_path / "out")
    _check_same_model(pipe, model)


def test_dynamic_method_is_refused_naming_pipeline_save(tmp_path: Path) -> None:
    pipe = _pipeline("llama", {"preset": "pp", "pruning": {"ratio": 0.4, "skip_layers": []}})
    with pytest.raises(ExportError, match=r"Pipeline\.save"):
        export_pruned(pipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_empty_out_is_refused_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    pipe = _pipeline("llama", UNIFORM)
    with pytest.raises(ExportError, match="is not empty"):
        export_pruned(pipe, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    export_pruned(pipe, tmp_path / "empty-is-fine")  # an existing empty folder is fine
    (tmp_path / "empty").mkdir()
    export_pruned(pipe, tmp_path / "empty")
    assert (tmp_path / "empty" / "ppf_manifest.json").is_file()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_folder_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ppf.ConfigError, match="not writable"):
            export_pruned(_pipeline("llama", UNIFORM), locked / "out")
    finally:
        locked.chmod(0o700)


def test_out_under_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ppf.ConfigError, match="is a file, not a folder"):
        export_pruned(_pipeline("llama", UNIFORM), tmp_path / "file" / "out")


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    class Broken:
        def save_pretrained(self, folder: Any) -> None:
            (Path(folder) / "tokenizer.json").write_text("{")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        export_pruned(_pipeline("llama", UNIFORM), tmp_path / "out", tokenizer=Broken())
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary folder


@pytest.fixture
def sharded_export(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    export_pruned(_pipeline("llama", ADAPTIVE), out, max_shard_size="100KB")
    assert len(list(out.glob("model-*.safetensors"))) > 1
    return out


def test_missing_shard_is_named(sharded_export: Path) -> None:
    shard = sorted(sharded_export.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ExportError, match=rf"{shard.name}' is missing"):
        load_pruned(sharded_export)


def test_truncated_file_is_named(sharded_export: Path) -> None:
    shard = sorted(sharded_export.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ExportError, match=rf"{shard.name}' has {len(data) // 2} bytes, {len(data)} were written"
    ):
        load_pruned(sharded_export)


def test_tampered_file_fails_its_hash(sharded_export: Path) -> None:
    shard = sorted(sharded_export.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="fails its SHA-256 check"):
        load_pruned(sharded_export)


# -- Pipeline.save / load_pipeline ------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["pp", "random-probe"])
def test_restored_pipeline_makes_bit_identical_decisions(preset: str, tmp_path: Path) -> None:
    pipe = _pipeline("llama-gqa", {"preset": preset, "pruning": {"ratio": 0.4, "skip_layers": [0]}})
    with pipe, torch.no_grad():
        for seed in (20, 21):
            pipe.model(_inputs(seed=seed, rows=4, length=32), use_cache=False)
    pipe.save(tmp_path / "state")
    x = _inputs(seed=22, rows=4, length=32)
    with pipe, torch.no_grad():
        expected = pipe.model(x, use_cache=False).logits
    masks = pipe.last_masks

    restored = load_pipeline(tiny_model("llama-gqa"), tmp_path / "state")
    assert restored.method == pipe.method
    with restored, torch.no_grad():
        got = restored.model(x, use_cache=False).logits
    assert torch.equal(got, expected)
    assert masks.keys() == restored.last_masks.keys()
    for key, mask in masks.items():
        assert torch.equal(restored.last_masks[key].kept_units, mask.kept_units), key


def test_restoring_on_another_model_names_the_differing_blocks(tmp_path: Path) -> None:
    pipe = _pipeline("llama", {"preset": "pp", "pruning": {"ratio": 0.4, "skip_layers": [0]}})
    pipe.save(tmp_path / "state")
    other = tiny_model("llama")
    with torch.no_grad():
        other.model.layers[2].mlp.down_proj.weight[0, 0] += 1.0
    with pytest.raises(ExportError, match=r"saved from another model: layer 2 mlp differ"):
        load_pipeline(other, tmp_path / "state")
    with pytest.raises(ExportError, match="layer 0 attention, layer 0 mlp"):
        load_pipeline(tiny_model("llama", seed=1), tmp_path / "state")


def test_saved_state_checked_by_hash(tmp_path: Path) -> None:
    pipe = _pipeline("llama", {"preset": "pp", "pruning": {"ratio": 0.4, "skip_layers": [0]}})
    pipe.save(tmp_path / "state")
    with pytest.raises(ExportError, match="is not empty"):
        pipe.save(tmp_path / "state")
    tensors = tmp_path / "state" / "state.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0x01
    tensors.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="state.safetensors' fails its SHA-256 check"):
        load_pipeline(tiny_model("llama"), tmp_path / "state")


# -- the command line -------------------------------------------------------------------------------------
def _config(tmp_path: Path, model_dir: Path, text_file: Path, method: dict[str, Any]) -> Path:
    config = {
        "model": {"name": str(model_dir), "device": "cpu"},
        "data": {"name": str(text_file), "seq_len": 32, "batch_size": 4, "max_batches": 2},
        "calibration": {"dataset": str(text_file), "n_samples": 8, "batch_size": 4, "cache": False},
        "methods": [method],
    }
    path = tmp_path / "export.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_cli_export_writes_a_loadable_checkpoint(
    tiny_model_dir: Any, tiny_text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, tiny_model_dir("llama"), tiny_text_file, UNIFORM)
    out = tmp_path / "exported"
    assert cli.main(["export", str(config), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} (hf format)" in printed
    model, tokenizer = load_pruned(out)
    assert model.config.num_attention_heads == 2 and tokenizer is not None
    assert cli.main(["export", str(config), "--out", str(out), "--no-progress"]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_cli_export_refuses_a_dynamic_method_before_loading(
    tiny_text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, tmp_path / "no-model-here", tiny_text_file, {"preset": "pp"})
    out = tmp_path / "exported"
    assert cli.main(["export", str(config), "--out", str(out)]) == 2
    assert "Pipeline.save" in capsys.readouterr().err
    assert not out.exists()
