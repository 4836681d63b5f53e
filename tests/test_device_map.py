"""Models spread over devices (``model.device_map``, accelerate hooks and offloading).

On a CPU-only machine a device map can still keep some layers on ``cpu`` and offload others to
``disk`` (their weights stay on ``meta`` between forwards), and accelerate's ``cpu_offload`` keeps
every weight in a CPU state dict: both run every hook path of a GPU split. Each must give exactly
the single-device logits, dense and pruned (dynamic ``pp``, static ``wanda-sp``, calibration
included), and attaching/detaching a pipeline must leave accelerate's hooks as they were.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import cpu_offload
from safetensors.torch import load_file

from ppframework.adapters import get_adapter
from ppframework.api import build_pipeline, calibration_history, load_config
from ppframework.config import ModelConfig, RunConfig
from ppframework.devices import execution_device, input_device, named_parameters_materialised
from ppframework.errors import ConfigError
from ppframework.history import HistoryStore
from ppframework.metrics.perplexity import evaluate_perplexity
from ppframework.models import ModelError, load_model, load_model_kwargs, model_fingerprint

SEQ_LEN = 32
#: Layers 0 and 2 (and the final norm, rotary tables) on the CPU; the embedding, layers 1 and 3 and
#: the LM head offloaded to disk, executed on the CPU.
SPLIT_MAP: dict[str, int | str] = {
    "model.embed_tokens": "disk",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "cpu",
    "model.layers.3": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "disk",
}
DISK_LAYERS = (1, 3)
EXACT: dict[str, float] = {"rtol": 0.0, "atol": 0.0}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    """One intra-op thread: the comparisons are exact, and tiny matmuls gain nothing from more."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------ config checks


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"device": "cpu", "device_map": "auto"}, "model.device='cpu' conflicts with model.device_map"),
        ({"max_memory": {"cpu": "1GiB"}}, "model.max_memory needs model.device_map"),
        (
            {"device_map": {"": "cpu"}, "max_memory": {"cpu": "1GiB"}},
            "model.max_memory only applies to a computed model.device_map",
        ),
        ({"device_map": {"": "cpu", "model.layers.1": "disk"}}, "'' (the whole model) cannot be combined"),
        ({"offload_folder": "offload"}, "model.offload_folder needs model.device_map"),
        ({"device_map": "everywhere"}, "model.device_map: unknown device map 'everywhere'"),
        ({"device_map": {"model.layers.0": "gpu"}}, "module 'model.layers.0' maps to 'gpu'"),
        ({"device_map": {"model.layers.0": -1}}, "maps to -1"),
        ({"device_map": {}}, "model.device_map: is an empty mapping"),
        ({"device_map": "auto", "max_memory": {"cpu": "lots"}}, "model.max_memory: 'cpu': 'lots' is not a"),
        ({"device_map": "auto", "max_memory": {"tpu": "1GiB"}}, "device 'tpu' is not a GPU index"),
        ({"device_map": "auto", "max_memory": {"cpu": 0}}, "0 bytes must be positive"),
    ],
)
def test_bad_placement_settings_fail_naming_the_field(model: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"model": model})
    assert message in str(info.value)


def test_placement_settings_are_normalised_to_accelerates_spelling() -> None:
    cfg = load_config(
        {"model": {"device_map": "balanced", "max_memory": {"cuda:1": "20gib", "0": 1000, "cpu": "1.5 GB"}}}
    )
    assert cfg.model.max_memory == {1: "20GiB", 0: 1000, "cpu": "1.5GB"}
    mapping = ModelConfig(device_map={"model.layers.0": "cuda:1", "model.layers.1": "2", "lm_head": "CPU"})
    assert mapping.device_map == {"model.layers.0": 1, "model.layers.1": 2, "lm_head": "cpu"}
    kwargs = load_model_kwargs(ModelConfig(device_map=SPLIT_MAP, offload_folder="off"))
    assert kwargs["device_map"] == SPLIT_MAP and kwargs["offload_folder"] == "off"
    assert kwargs["max_memory"] is None and kwargs["device"] == "auto"


def test_load_model_refuses_bad_placements(tiny_model_dir: Any, tmp_path: Path) -> None:
    path = str(tiny_model_dir("llama"))
    with pytest.raises(ModelError, match="conflicts with model.device_map"):
        load_model(path, device="cpu", device_map="auto")
    with pytest.raises(ModelError, match="model.max_memory needs model.device_map"):
        load_model(path, max_memory={"cpu": "1GiB"})
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            load_model(path, device_map={"": 0})
    # maps that leave modules out: accelerate's check (several devices), ours (one device, no hooks)
    with pytest.raises(ModelError, match=r"model.device_map: .*does not give any device .*embed_tokens"):
        load_model(path, device_map={"model.layers.0": "cpu", "lm_head": "disk"})
    with pytest.raises(ModelError, match=r"does not place model.embed_tokens, model.layers.1, "):
        load_model(path, device_map={"model.layers.0": "cpu"})
    without_rotary = {k: v for k, v in SPLIT_MAP.items() if k != "model.rotary_emb"}
    with pytest.raises(ModelError, match=r"does not place model.rotary_emb;"):  # it has buffers only
        load_model(path, device_map=without_rotary, offload_folder=str(tmp_path))
    # an entry for a module the model does not have (a typo) is named, not ignored
    with pytest.raises(ModelError, match=r"model.device_map\['model.layers.9'\]: the model has no module"):
        load_model(path, device_map={**SPLIT_MAP, "model.layers.9": "cpu"}, offload_folder=str(tmp_path))
    with pytest.raises(ModelError, match=r"model.device_map\['lm_haed'\]: the model has no module"):
        load_model(path, device_map={"model": "cpu", "lm_haed": "cpu"})


def test_disk_offload_of_safetensors_needs_no_offload_folder(tiny_model_dir: Any) -> None:
    model, _ = load_model(str(tiny_model_dir("llama")), device_map=dict(SPLIT_MAP))
    assert _disk_weights_offloaded(model)  # read in place from the model's own safetensors file


def test_weights_to_re_save_need_the_offload_folder(tiny_model_dir: Any, tmp_path: Path) -> None:
    """A pickled checkpoint (pytorch_model.bin) cannot be read in place: transformers re-saves the
    disk-offloaded weights, which needs model.offload_folder."""
    source = tiny_model_dir("llama")
    pickled = tmp_path / "pickled"
    shutil.copytree(source, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(str(source / "model.safetensors")), pickled / "pytorch_model.bin")
    with pytest.raises(ModelError, match="model.offload_folder: the device map offloads weights to disk"):
        load_model(str(pickled), device_map=dict(SPLIT_MAP))
    folder = tmp_path / "offload"
    model, _ = load_model(str(pickled), device_map=dict(SPLIT_MAP), offload_folder=str(folder))
    assert _disk_weights_offloaded(model) and any(folder.glob("model.layers.1.*.safetensors"))
    reference, _ = load_model(str(source), device="cpu")
    ids = _batches(1)[0]
    torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), **EXACT)


# ------------------------------------------------------------------------------------------ models


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Any) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def single(model_dir: Path) -> tuple[Any, Any]:
    return load_model(str(model_dir), device="cpu")


@pytest.fixture(scope="module")
def split(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Layers on the CPU and layers offloaded to disk (through ``model.device_map``)."""
    folder = tmp_path_factory.mktemp("offload")
    model, _ = load_model(str(model_dir), device_map=dict(SPLIT_MAP), offload_folder=str(folder))
    return model


@pytest.fixture(scope="module")
def offloaded(model_dir: Path) -> Any:
    """accelerate's CPU offload: every weight on ``meta``, held in a CPU state dict."""
    model, _ = load_model(str(model_dir), device="cpu")
    return cpu_offload(model, execution_device=torch.device("cpu"))


def _run_config(text_file: Path, method: dict[str, Any] | str) -> Any:
    return load_config(
        {
            "model": {"name": "unused"},
            "data": {"name": str(text_file), "seq_len": SEQ_LEN, "batch_size": 4},
            "calibration": {"dataset": str(text_file), "n_samples": 8, "batch_size": 4, "cache": False},
            "methods": [method],
        }
    )


def _batches(n: int = 2) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(4, 200, (4, SEQ_LEN), generator=gen) for _ in range(n)]


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _disk_weights_offloaded(model: Any) -> bool:
    layers = model.model.layers
    return all(p.device.type == "meta" for i in DISK_LAYERS for p in layers[i].parameters())


@pytest.fixture(params=["split", "offloaded"])
def mapped(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(request.param)


def test_the_device_maps_really_offload(split: Any, offloaded: Any) -> None:
    assert split.hf_device_map == SPLIT_MAP
    assert _disk_weights_offloaded(split)
    assert split.model.layers[0].self_attn.q_proj.weight.device.type == "cpu"
    assert all(p.device.type == "meta" for p in offloaded.parameters())
    for model in (split, offloaded):
        assert input_device(model) == torch.device("cpu")
        assert all(execution_device(layer) == torch.device("cpu") for layer in model.model.layers)


def test_offloaded_models_keep_the_single_device_fingerprint(
    single: tuple[Any, Any], split: Any, offloaded: Any
) -> None:
    model, _ = single
    names = [name for name, _ in model.named_parameters()]
    assert [name for name, _ in named_parameters_materialised(split)] == names
    assert model_fingerprint(split) == model_fingerprint(model) == model_fingerprint(offloaded)
    assert _disk_weights_offloaded(split)  # reading the values back did not materialise them


def test_dense_logits_match(single: tuple[Any, Any], mapped: Any) -> None:
    model, _ = single
    for ids in _batches():
        torch.testing.assert_close(_logits(mapped, ids), _logits(model, ids), **EXACT)


def test_calibration_matches(single: tuple[Any, Any], mapped: Any, tiny_text_file: Path) -> None:
    model, tok = single
    cfg = _run_config(tiny_text_file, {"preset": "pp", "pruning": {"ratio": 0.4, "skip_layers": [0]}})
    reference, _ = calibration_history(model, tok, cfg, progress=False)
    store, _ = calibration_history(mapped, tok, cfg, progress=False)
    assert set(store.blocks) == set(reference.blocks)
    for key, hist in reference.blocks.items():
        torch.testing.assert_close(store.blocks[key].sq_mean, hist.sq_mean, **EXACT)
        torch.testing.assert_close(store.blocks[key].mean, hist.mean, **EXACT)


def _pruned_run(
    model: Any, tok: Any, cfg: RunConfig
) -> tuple[list[torch.Tensor], float, HistoryStore | None]:
    pipe = build_pipeline(model, cfg, tokenizer=tok, progress=False)
    with pipe:
        out = [_logits(model, ids) for ids in _batches()]
    return out, pipe.realised_ratio(), pipe.history


@pytest.mark.parametrize(
    "method",
    [
        {"preset": "pp", "pruning": {"ratio": 0.4, "skip_layers": [0]}},
        {"preset": "wanda-sp", "pruning": {"ratio": 0.4, "skip_layers": [0]}},
    ],
    ids=["pp", "wanda-sp"],
)
def test_pruned_logits_match(
    single: tuple[Any, Any], mapped: Any, tiny_text_file: Path, method: dict[str, Any]
) -> None:
    model, tok = single
    cfg = _run_config(tiny_text_file, method)
    reference, ratio, ref_history = _pruned_run(model, tok, cfg)
    got, mapped_ratio, history = _pruned_run(mapped, tok, cfg)
    assert ratio > 0.2 and mapped_ratio == ratio
    for a, b in zip(got, reference, strict=True):
        torch.testing.assert_close(a, b, **EXACT)
    assert history is not None and ref_history is not None
    for key, hist in ref_history.blocks.items():  # pp's EMA updates match too
        torch.testing.assert_close(history.blocks[key].sq_mean, hist.sq_mean, **EXACT)
    dense = [_logits(model, ids) for ids in _batches()]
    for ids, expected in zip(_batches(), dense, strict=True):  # detached: dense again
        torch.testing.assert_close(_logits(mapped, ids), expected, **EXACT)


def test_perplexity_matches(single: tuple[Any, Any], split: Any, tiny_text_file: Path) -> None:
    model, tok = single
    cfg = _run_config(tiny_text_file, {"preset": "pp", "pruning": {"ratio": 0.4, "skip_layers": [0]}})
    results = []
    for candidate in (model, split):
        with build_pipeline(candidate, cfg, tokenizer=tok, progress=False) as pipe:
            result = evaluate_perplexity(candidate, _batches(3), progress=False, untracked=pipe.untracked)
            results.append(result)
    assert results[0].perplexity == results[1].perplexity and results[0].tokens == results[1].tokens


@pytest.mark.parametrize("decode", ["frozen", "dense"])
def test_generation_matches(single: tuple[Any, Any], split: Any, tiny_text_file: Path, decode: str) -> None:
    model, tok = single
    method = {"preset": "pp", "pruning": {"ratio": 0.4, "skip_layers": [0]}, "decode": decode}
    cfg = _run_config(tiny_text_file, method)
    tok.padding_side = "left"
    batch = tok(["the river and the", "a village market is"], return_tensors="pt", padding=True)
    outputs = []
    for candidate in (model, split):
        with build_pipeline(candidate, cfg, tokenizer=tok, progress=False):
            out = candidate.generate(
                **batch, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id
            )
            outputs.append(out)
    torch.testing.assert_close(outputs[1], outputs[0], **EXACT)


# ------------------------------------------------------------------------------------------ attach / detach


def _hook_state(model: Any) -> list[tuple[Any, Any, Any]]:
    return [
        (module.__dict__.get("forward"), module.__dict__.get("_hf_hook"), module.__dict__.get("_old_forward"))
        for module in model.modules()
    ]


@pytest.mark.parametrize("preset", ["pp", "wanda-sp"])
def test_attach_detach_keeps_accelerates_hooks(
    mapped: Any, single: tuple[Any, Any], tiny_text_file: Path, preset: str
) -> None:
    _, tok = single
    cfg = _run_config(tiny_text_file, {"preset": preset, "pruning": {"ratio": 0.4, "skip_layers": [0]}})
    ids = _batches(1)[0]
    before_logits = _logits(mapped, ids)
    before = _hook_state(mapped)
    layers = mapped.model.layers
    hooked = [layer.__dict__.get("forward") for layer in layers]  # cpu_offload hooks only the leaves
    pipe = build_pipeline(mapped, cfg, tokenizer=tok, progress=False)
    with pipe:
        assert all(layers[i].__dict__["forward"] is not hooked[i] for i in (1, 2, 3))
        assert layers[0].__dict__.get("forward") is hooked[0]  # a skipped layer keeps its forward
        _logits(mapped, ids)
        assert all(p.device.type == "meta" for p in layers[3].parameters())  # offloaded between forwards
    assert _hook_state(mapped) == before
    assert all(layer.__dict__.get("forward") is hooked[i] for i, layer in enumerate(layers))
    assert all(p.device.type == "meta" for i in DISK_LAYERS for p in layers[i].parameters())
    torch.testing.assert_close(_logits(mapped, ids), before_logits, **EXACT)
    pipe.release()
    assert _hook_state(mapped) == before


# ------------------------------------------------------------------------------------------ families


def _alternating_map(model: Any) -> dict[str, int | str]:
    """Every top-level module on the CPU except the odd decoder layers, offloaded to disk."""
    layers = get_adapter(model).layers
    mapping: dict[str, int | str] = {}

    def visit(prefix: str, module: Any) -> None:
        for name, child in module.named_children():
            if child is layers:
                for i in range(len(layers)):
                    mapping[f"{prefix}{name}.{i}"] = "disk" if i % 2 else "cpu"
            elif any(sub is layers for sub in child.modules()):
                visit(f"{prefix}{name}.", child)
            else:
                mapping[f"{prefix}{name}"] = "cpu"

    visit("", model)
    return mapping


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2", "opt", "phi3", "gemma3", "mistral-swa"])
def test_other_families_match_when_split(
    family: str, tiny_model_dir: Any, tiny_text_file: Path, tmp_path: Path
) -> None:
    path = str(tiny_model_dir(family))
    model, tok = load_model(path, device="cpu")
    mapping = _alternating_map(model)
    split_model, _ = load_model(path, device_map=mapping, offload_folder=str(tmp_path / "offload"))
    assert split_model.hf_device_map == mapping
    cfg = _run_config(tiny_text_file, {"preset": "pp", "pruning": {"ratio": 0.4, "skip_layers": [0]}})
    reference, ratio, _ = _pruned_run(model, tok, cfg)
    got, split_ratio, _ = _pruned_run(split_model, tok, cfg)
    assert split_ratio == ratio > 0.2
    for a, b in zip(got, reference, strict=True):
        torch.testing.assert_close(a, b, **EXACT)


# ------------------------------------------------------------------------------------------ per-device state


def test_batch_state_is_copied_once_per_device() -> None:
    """What a layer on another device gets (exercised here with ``meta`` as the other device)."""
    from ppframework.pipeline import _Batch
    from ppframework.positions import RowShift

    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    shift = RowShift.from_shifts(torch.tensor([1, 0]), 3)
    batch = _Batch(mask, mask.bool().any(0), True, mask.sum(0), shift=shift, key_mask=mask)
    assert batch.on(torch.device("cpu")) is batch and shift.to(torch.device("cpu")) is shift
    meta = torch.device("meta")
    moved = batch.on(meta)
    assert moved is batch.on(meta) and moved is not batch
    tensors = [moved.attention_mask, moved.position_valid, moved.rows_per_position, moved.key_mask]
    tensors += [moved.shift.shifts, moved.shift.gather_index, moved.shift.scatter_index]
    assert all(t.device == meta for t in tensors)
    assert moved.has_padding and moved._bias == {} and moved._bias is not batch._bias
    assert batch.attention_mask.device.type == "cpu"  # the original stays where it was


def test_history_is_placed_per_layer() -> None:
    from ppframework.history import BlockHistory
    from ppframework.types import BlockKind

    store = HistoryStore(
        {
            (layer, kind): BlockHistory(torch.ones(4, 2), torch.zeros(4, 2))
            for layer in range(3)
            for kind in BlockKind
        }
    )
    meta = torch.device("meta")
    store.place(lambda layer: meta if layer == 1 else torch.device("cpu"))
    for (layer, _), hist in store.blocks.items():
        expected = "meta" if layer == 1 else "cpu"
        assert hist.sq_mean.device.type == expected and hist.mean.device.type == expected


def test_ppf_run_with_a_device_map_matches_the_single_device_run(
    model_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    """``ppf run`` / ``ppf ablate`` load through ``model.device_map`` (runner.RunSession)."""
    from ppframework.runner import run

    def config(model: dict[str, Any]) -> Any:
        return load_config(
            {
                "model": {"name": str(model_dir), **model},
                "data": {"name": str(tiny_text_file), "seq_len": SEQ_LEN, "batch_size": 4, "max_batches": 3},
                "calibration": {"dataset": str(tiny_text_file), "n_samples": 8, "cache": False},
                "methods": [
                    {"preset": "pp", "pruning": {"ratio": 0.4, "skip_layers": [0]}},
                    {"preset": "wanda-sp", "pruning": {"ratio": 0.4, "skip_layers": [0]}},
                ],
            }
        )

    single_report = run(config({"device": "cpu"}), progress=False)
    mapped = config({"device_map": dict(SPLIT_MAP), "offload_folder": str(tmp_path / "offload")})
    mapped_report = run(mapped, progress=False)
    assert not mapped_report.failures
    assert [r.perplexity for r in mapped_report.rows] == [r.perplexity for r in single_report.rows]
    assert mapped_report.settings["resolved"]["device"] == "cpu"
