"""Generation measures without future tokens (``ppframework/generation/fidelity.py``): multi-token decode
steps, fidelity to dense checked by hand, padding, continuation perplexity, and the benchmark script."""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from benchmark_scripts import load_benchmark

from ppframework.adapters import get_adapter
from ppframework.calibration import calibrate
from ppframework.config import MethodConfig
from ppframework.errors import ConfigError
from ppframework.generation.fidelity import (
    FidelityResult,
    PromptFidelity,
    continuation_perplexity,
    dense_continuations,
    fidelity,
    generation_positions,
    left_pad,
    teacher_forced_logits,
)
from ppframework.hookspecs import hookimpl
from ppframework.pipeline import Pipeline
from ppframework.testing.tiny import tiny_model, tiny_tokenizer

PROMPTS = ["Hello there, how are", "A much longer prompt, to test left padding here", "Short"]
PAD = 3
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "prompt_conditioned.py"


def _prompt_ids(prompts: list[str] = PROMPTS) -> list[list[int]]:
    tok = tiny_tokenizer()
    return [list(tok(p)["input_ids"]) for p in prompts]


def _pipeline(model: torch.nn.Module, preset: str = "pp", history=None, **fields) -> Pipeline:
    pruning = {"skip_layers": [0], "ratio": 0.5, **fields.pop("pruning", {})}
    method = MethodConfig.model_validate({"preset": preset, "pruning": pruning, **fields})
    if method.needs_calibration and history is None:
        ids = torch.randint(4, 90, (4, 128), generator=torch.Generator().manual_seed(1))
        history = calibrate(model, get_adapter(model), [ids], progress=False)
    return Pipeline(model, method, history=history.clone() if history is not None else None)


def _generate(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, new: int):
    with torch.inference_mode():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=PAD,
            return_dict_in_generate=True,
            output_logits=True,
        )


class ReplayMasks:
    """Replaces every mask decision by a recorded one (an independent way to run a frozen decision)."""

    def __init__(self, masks):
        self.masks = masks

    @hookimpl(wrapper=True)
    def apply_mask(self, ctx, scores, ratio):
        yield
        return self.masks[(ctx.layer, ctx.kind)]


# --------------------------------------------------------------------------- multi-token decode steps


@pytest.mark.parametrize("family", ["llama-gqa", "opt", "mistral-swa", "gemma3"])
def test_multi_token_decode_step_of_the_dense_model_equals_a_plain_forward(family):
    model = tiny_model(family).eval()
    ids, mask = left_pad(_prompt_ids(), PAD)
    new = _generate(model, ids, mask, 10).sequences[:, ids.shape[1] :]
    forced = teacher_forced_logits(model, ids, mask, new)
    whole = torch.cat([ids, new], dim=1)
    whole_mask = torch.cat([mask, torch.ones_like(new)], dim=1)
    with torch.inference_mode():
        plain = model(
            input_ids=whole,
            attention_mask=whole_mask,
            position_ids=generation_positions(whole_mask),
            use_cache=False,
        ).logits
    torch.testing.assert_close(forced, plain[:, ids.shape[1] - 1 : -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("family", "decode", "gqa"),
    [
        ("llama-gqa", "frozen", "query-only"),
        ("llama-gqa", "frozen", "group"),
        ("llama-gqa", "dense", "query-only"),
        ("llama-gqa", "dense", "group"),
        ("opt", "frozen", "query-only"),
        ("opt", "dense", "query-only"),
        ("mistral-swa", "frozen", "group"),
        ("gemma3", "frozen", "query-only"),
        ("gemma3", "dense", "group"),
    ],
)
def test_multi_token_decode_step_equals_generating_token_by_token(family, decode, gqa):
    """A pruned prefill, then the greedy tokens teacher-forced in one decode step (and in steps of 3,
    and one at a time): the logits ``generate`` produced feeding them one by one, under ``frozen``
    (the prefill's masks) and under ``dense`` (unpruned decode layers)."""
    model = tiny_model(family).eval()
    ids, mask = left_pad(_prompt_ids(), PAD)
    history = _pipeline(model).history
    with _pipeline(model, history=history, decode=decode, pruning={"gqa_policy": gqa}):
        out = _generate(model, ids, mask, 10)
    new = out.sequences[:, ids.shape[1] :]
    stepwise = torch.stack(out.logits, dim=1)
    for step_tokens in (None, 3, 1):
        with _pipeline(model, history=history, decode=decode, pruning={"gqa_policy": gqa}) as pipe:
            forced = teacher_forced_logits(model, ids, mask, new, step_tokens=step_tokens)
        assert any(m.n_kept < m.total_units for m in pipe.last_masks.values())
        torch.testing.assert_close(forced, stepwise, atol=1e-4, rtol=1e-4, msg=f"step_tokens={step_tokens}")


# --------------------------------------------------------------------------- fidelity


def _kl_by_hand(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p = torch.softmax(p_logits.double(), dim=-1)
    q = torch.softmax(q_logits.double(), dim=-1)
    return float((p * (p.log() - q.log())).sum())


def test_fidelity_of_one_prompt_by_hand():
    """Dense greedy tokens, the method's decision on the prompt replayed over prompt + continuation in
    one plain forward, then top-1 agreement and KL(dense || method) per token with plain torch."""
    model = tiny_model("llama-gqa").eval()
    prompt = _prompt_ids()[1]
    n_new = 12
    (continuation,) = dense_continuations(model, [prompt], n_new, pad_token_id=PAD, stop_at_eos=False)
    assert len(continuation) == n_new
    pipe = _pipeline(model)
    result = fidelity(model, pipe, [prompt], [continuation], pad_token_id=PAD)
    masks = dict(pipe.last_masks)
    assert any(m.n_kept < m.total_units for m in masks.values())

    whole = torch.tensor([prompt + continuation])
    with torch.inference_mode():
        dense_logits = model(input_ids=whole, use_cache=False).logits[0]
        replay = _pipeline(model)
        replay.plugin_manager.register(ReplayMasks(masks))
        with replay:
            method_logits = model(input_ids=whole, use_cache=False).logits[0]
    start = len(prompt) - 1  # the prompt's last token predicts the first continuation token
    agree, kl = [], []
    for j, token in enumerate(continuation):
        agree.append(int(method_logits[start + j].argmax()) == token)
        kl.append(_kl_by_hand(dense_logits[start + j], method_logits[start + j]))
        assert int(dense_logits[start + j].argmax()) == token
    assert result.tokens == n_new and [p.tokens for p in result.prompts] == [n_new]
    assert result.top1 == pytest.approx(sum(agree) / n_new)
    assert result.kl == pytest.approx(sum(kl) / n_new, rel=1e-3, abs=1e-6)
    assert result.prompts[0].kl == result.kl and result.dense_top1 == 1.0
    assert 0 < result.kl and result.top1 < 1  # the method changes something at ratio 0.5


def test_dense_against_dense_is_exact():
    model = tiny_model("llama-gqa").eval()
    prompts = _prompt_ids()
    continuations = dense_continuations(model, prompts, 8, pad_token_id=PAD, stop_at_eos=False)
    for pipeline in (None, _pipeline(model, "dense", pruning={"ratio": 0.0})):
        for batch_size in (1, 3):
            result = fidelity(
                model, pipeline, prompts, continuations, pad_token_id=PAD, batch_size=batch_size
            )
            assert result.top1 == 1.0 and result.kl == 0.0 and result.tokens == 24


def test_padding_is_not_scored_batch_equals_per_prompt():
    """Prompts of different lengths (left padding) and continuations of different lengths (right
    padding): per-prompt scores of one batch of 3 = those of three batches of 1. A static method,
    so that the decision does not depend on the batch."""
    model = tiny_model("llama-gqa").eval()
    prompts = _prompt_ids()
    continuations = dense_continuations(model, prompts, 9, pad_token_id=PAD, stop_at_eos=False)
    continuations[2] = continuations[2][:4]  # as if the dense model had stopped there
    history = _pipeline(model).history
    results = {}
    for batch_size in (1, 3):
        pipe = _pipeline(model, "wanda-sp", history=history)
        results[batch_size] = fidelity(
            model, pipe, prompts, continuations, pad_token_id=PAD, batch_size=batch_size
        )
    one, batch = results[1], results[3]
    assert [p.tokens for p in batch.prompts] == [p.tokens for p in one.prompts] == [9, 9, 4]
    assert [p.agree for p in batch.prompts] == [p.agree for p in one.prompts]
    for a, b in zip(one.prompts, batch.prompts, strict=True):
        assert b.kl == pytest.approx(a.kl, rel=1e-3, abs=1e-6)
    assert batch.top1 == pytest.approx(one.top1) and batch.kl == pytest.approx(one.kl, rel=1e-3)
    assert 0 < one.kl


def test_dense_continuations_stop_at_eos_or_not():
    model = tiny_model("llama").eval()
    prompts = _prompt_ids()
    full = dense_continuations(model, prompts, 6, pad_token_id=PAD, stop_at_eos=False, batch_size=3)
    assert [len(c) for c in full] == [6, 6, 6]
    stopped = dense_continuations(model, prompts, 6, pad_token_id=PAD)
    eos = model.generation_config.eos_token_id
    for a, b in zip(full, stopped, strict=True):
        assert a[: len(b)] == b
        assert len(b) == 6 or b[-1] == eos
    pipe = _pipeline(model)
    with pipe, pytest.raises(RuntimeError, match="attached"):
        dense_continuations(model, prompts, 2, pad_token_id=PAD)


# --------------------------------------------------------------------------- continuation perplexity


def test_continuation_perplexity_of_the_dense_model_by_hand():
    model = tiny_model("llama-gqa").eval()
    windows = torch.randint(4, 90, (8, 40), generator=torch.Generator().manual_seed(3))
    prefix = 24
    with torch.inference_mode():
        logits = model(input_ids=windows, use_cache=False).logits.double()
    nll = -torch.log_softmax(logits[:, prefix - 1 : -1], dim=-1).gather(-1, windows[:, prefix:, None])
    expected = math.exp(float(nll.mean()))
    for batch_size in (1, 8, 3):
        result = continuation_perplexity(model, None, windows, prefix, batch_size=batch_size)
        assert result.tokens == 8 * 16 and result.windows == 8
        assert result.perplexity == pytest.approx(expected, rel=1e-5)
        # each window's own NLL, in order, for paired comparisons by window
        assert result.window_nll == pytest.approx(nll.sum(dim=(1, 2)).tolist(), rel=1e-5)
        assert result.to_json()["window_nll"] == result.window_nll
        assert sum(result.window_nll) == pytest.approx(result.nll_sum, rel=1e-9)


def test_continuation_perplexity_of_a_pruned_method_scores_under_the_prefix_decision():
    """Batch 1 and 8 run; the decision is the prefix's: replaying its masks over the whole window in
    one plain forward gives the same NLL."""
    model = tiny_model("llama-gqa").eval()
    windows = torch.randint(4, 90, (8, 40), generator=torch.Generator().manual_seed(3))
    history = _pipeline(model).history
    dense = continuation_perplexity(model, None, windows, 24).perplexity
    for batch_size in (1, 8):
        pipe = _pipeline(model, history=history)
        result = continuation_perplexity(model, pipe, windows, 24, batch_size=batch_size)
        assert math.isfinite(result.perplexity) and result.perplexity != dense
    replay = _pipeline(model, history=history)
    replay.plugin_manager.register(ReplayMasks(dict(pipe.last_masks)))
    with replay, torch.inference_mode():
        logits = model(input_ids=windows, use_cache=False).logits
    nll = F.cross_entropy(logits[:, 23:-1].reshape(-1, logits.shape[-1]), windows[:, 24:].reshape(-1))
    assert result.perplexity == pytest.approx(math.exp(float(nll)), rel=1e-4)
    with pytest.raises(Exception, match="prefix_len"):
        continuation_perplexity(model, None, windows, 40)


# --------------------------------------------------------------------------- the benchmark script


def _humaneval_folder(root: Path) -> Path:
    """A data folder holding three HumanEval-shaped items (the task reads only these fields)."""
    folder = root / "generation" / "humaneval"
    folder.mkdir(parents=True)
    records = [
        {
            "task_id": f"HumanEval/{i}",
            "prompt": f"def add_{i}(a, b):\n    '''Add {i} numbers.'''\n",
            "entry_point": f"add_{i}",
            "test": "def check(f):\n    assert f(1, 2) == 3\n",
            "canonical_solution": "    return a + b\n",
        }
        for i in range(3)
    ]
    with gzip.open(folder / "HumanEval.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)
    return root


def test_prompt_conditioned_benchmark_tiny_end_to_end(tmp_path, tiny_model_dir, tiny_text_file):
    config = {
        "model": {"name": str(tiny_model_dir("llama-gqa")), "device": "cpu"},
        "data": {
            "name": str(tiny_text_file),
            "seq_len": 64,
            "data_dir": str(_humaneval_folder(tmp_path / "data")),
        },
        "calibration": {
            "dataset": str(tiny_text_file),
            "n_samples": 8,
            "batch_size": 4,
            "cache_dir": str(tmp_path / "calibration-cache"),
        },
        "methods": [{"preset": "pp"}],
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    out = tmp_path / "out"
    command = [
        sys.executable,
        str(SCRIPT),
        str(path),
        "--methods", "dense", "pp", "wanda-sp",
        "--ratios", "0.2", "0.4",
        "--batch-sizes", "1", "2",
        "--prompt-sets", "humaneval", "mbpp",
        "--corpora", str(tiny_text_file),
        "--prompts", "3",
        "--new-tokens", "6",
        "--windows", "4",
        "--window-len", "48",
        "--set", "calibration.n_samples=8",
        "--method-set", "pruning.skip_layers=[0]",
        "--out", str(out),
        "--no-progress",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert report["complete"] and "mbpp" in report["skipped"]  # no MBPP file in the folder
    labels = [(row["method"], row["batch_size"]) for row in report["rows"]]
    expected = [
        (m, b) for m in ("dense 0%", "pp 20%", "pp 40%", "wanda-sp 20%", "wanda-sp 40%") for b in (1, 2)
    ]
    assert labels == expected
    corpus = str(tiny_text_file)
    for row in report["rows"]:
        fid = row["fidelity"]["humaneval"]
        assert fid["tokens"] > 0 and len(fid["per_prompt"]) == 3
        ppl = row["continuation_perplexity"][corpus]
        assert ppl["tokens"] == 4 * 24 and ppl["prefix_len"] == 24 and math.isfinite(ppl["perplexity"])
        if row["method"] == "dense 0%":
            assert fid["top1"] == 1.0 and fid["kl"] == 0.0
        else:
            assert fid["kl"] > 0
    table = (out / "results.md").read_text()
    assert table.count("\n| ") == 1 + len(expected) and "humaneval top-1" in table

    # A rerun with the same settings keeps every row and computes nothing new.
    before = (out / "results.json").read_text()
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["rows"] == json.loads(before)["rows"]

    # A run of other methods into the same folder adds its rows and keeps every earlier one.
    subset = command[:]
    subset[subset.index("--methods") + 1 : subset.index("--ratios")] = ["magnitude"]
    subset[subset.index("--batch-sizes") + 1 : subset.index("--prompt-sets")] = ["1"]
    more = subprocess.run(subset, capture_output=True, text=True, timeout=120)
    assert more.returncode == 0, more.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows[: len(expected)] == json.loads(before)["rows"]
    assert [(r["method"], r["batch_size"]) for r in rows[len(expected) :]] == [
        ("magnitude 20%", 1),
        ("magnitude 40%", 1),
    ]


def test_prompt_conditioned_only_keeps_the_named_methods_and_names_unknown_ones(tmp_path):
    module = load_benchmark("prompt_conditioned")
    config = tmp_path / "run.yaml"
    methods = [
        {"preset": "dense"},
        {"preset": "pp", "pruning": {"ratio": 0.2}},
        {"preset": "pp", "name": "pp-seq", "decision": "sequence"},
        {"preset": "wanda-sp"},
    ]
    config.write_text(yaml.safe_dump({"model": {"name": "smollm2-135m"}, "methods": methods}))
    args = module.parse_args([str(config), "--only", "pp-seq", "dense"])
    cfg = module.plan_config(args)
    assert [m.label for m in cfg.methods] == ["dense 0%", "pp-seq 40%"]
    assert cfg.methods[1].decision == "sequence"
    with pytest.raises(ConfigError, match=r"--only: no method named \['griffin'\]"):
        module.plan_config(module.parse_args([str(config), "--only", "griffin"]))


def test_mixed_batches_interleave_the_sets_and_split_back_to_each_sets_own_order():
    """``--mixed-batches``: consecutive prompts come from different sets (so does every batch of 2 or
    more while the sets last), and each prompt's scores go back to its own set, in its own order, with
    the dense sanity count summed per set."""
    module = load_benchmark("prompt_conditioned")
    prompts = {"humaneval": [[1]] * 3, "mbpp": [[2]] * 1, "xsum": [[3]] * 2}
    order = module.interleaved(prompts)
    assert order == [
        ("humaneval", 0), ("mbpp", 0), ("xsum", 0), ("humaneval", 1), ("xsum", 1), ("humaneval", 2),
    ]  # fmt: skip
    scores = [
        PromptFidelity(tokens=10 + k, agree=k, kl_sum=0.1 * k, dense_agree=1) for k in range(len(order))
    ]
    parts = module.split_by_set(FidelityResult(prompts=scores, dense_agree=len(order)), order)
    for name, ids in prompts.items():
        mine = [k for k, (set_name, _) in enumerate(order) if set_name == name]
        assert parts[name].prompts == [scores[k] for k in mine]
        assert parts[name].dense_agree == len(ids)
    assert module.interleaved({}) == []


def test_fidelity_records_each_prompts_dense_sanity_count():
    model = tiny_model("llama-gqa").eval()
    prompts = _prompt_ids()
    references = dense_continuations(model, prompts, 8, pad_token_id=PAD, stop_at_eos=False)
    result = fidelity(model, None, prompts, references, pad_token_id=PAD, batch_size=2)
    assert [p.dense_agree for p in result.prompts] == [p.tokens for p in result.prompts]
    assert sum(p.dense_agree for p in result.prompts) == result.dense_agree == result.tokens
