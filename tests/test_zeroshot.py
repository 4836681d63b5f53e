"""Tests for ppframework.zeroshot: prompt builders on real data, loading, batching and scoring."""

from __future__ import annotations

import math
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from ppframework.errors import ConfigError
from ppframework.testing.tiny import tiny_model, tiny_tokenizer
from ppframework.zeroshot import scoring
from ppframework.zeroshot.scoring import (
    Request,
    TaskResult,
    average_accuracy,
    build_batches,
    continuation_length,
    encode_pair,
    evaluate_items,
    evaluate_task,
    evaluate_tasks,
    make_requests,
    score_requests,
)
from ppframework.zeroshot.tasks import (
    TASK_NAMES,
    MultipleChoiceItem,
    get_task,
    hellaswag_preprocess,
    load_task,
    local_task_files,
)

PAD = 3  # tiny tokenizer <pad>
BOS = 1  # tiny tokenizer <s>


@pytest.fixture
def zs_dir(shared_data_dir: Path) -> Path:
    """The shared data folder, skipping when its zeroshot/ sub-folder is absent."""
    if not (shared_data_dir / "zeroshot").is_dir():
        pytest.skip("shared data folder has no zeroshot/ sub-folder")
    return shared_data_dir


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama() -> Any:
    return tiny_model("llama")


# --------------------------------------------------------------------------- (a) prompts on real data

# Hand-copied from the first line of /work/shared/data/zeroshot/boolq/val.jsonl.
BOOLQ_PASSAGE = (
    "Ethanol fuel -- All biomass goes through at least some of these steps: it needs to be grown, "
    "collected, dried, fermented, distilled, and burned. All of these steps require resources and an "
    "infrastructure. The total amount of energy input into the process compared to the energy released "
    "by burning the resulting ethanol fuel is known as the energy balance (or ``energy returned on "
    "energy invested''). Figures compiled in a 2007 report by National Geographic Magazine point to "
    "modest results for corn ethanol produced in the US: one unit of fossil-fuel energy is required to "
    "create 1.3 energy units from the resulting ethanol. The energy balance for sugarcane ethanol "
    "produced in Brazil is more favorable, with one unit of fossil-fuel energy required to create 8 "
    "from the ethanol. Energy balance estimates are not easily produced, thus numerous such reports "
    "have been generated that are contradictory. For instance, a separate survey reports that "
    "production of ethanol from sugarcane, which requires a tropical climate to grow productively, "
    "returns from 8 to 9 units of energy for each unit expended, as compared to corn, which only "
    "returns about 1.34 units of fuel energy for each unit of energy expended. A 2006 University of "
    "California Berkeley study, after analyzing six separate studies, concluded that producing "
    "ethanol from corn uses much less petroleum than producing gasoline."
)

EXPECTED_FIRST: dict[str, tuple[list[str], list[str], int]] = {
    "boolq": (
        [BOOLQ_PASSAGE + "\nQuestion: does ethanol take more energy make that produces?\nAnswer:"],
        [" no", " yes"],
        0,  # label "false"
    ),
    "piqa": (
        ["Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"],
        [
            " Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper "
            "strips, you will also need to supply it with a water bottle and a food dish.",
            " Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans "
            "material, you will also need to supply it with a water bottle and a food dish.",
        ],
        0,  # first line of valid-labels.lst
    ),
    "hellaswag": (
        ["Roof shingle removal: A man is sitting on a roof. he"],
        [
            " is using wrap to wrap a pair of skis.",
            " is ripping level tiles off.",
            " is holding a rubik's cube.",
            " starts pulling up roofing on a roof.",
        ],
        3,
    ),
    "winogrande": (
        [
            "Sarah was a much better surgeon than Maria so Sarah",
            "Sarah was a much better surgeon than Maria so Maria",
        ],
        [" always got the easier cases."],
        1,  # answer "2"
    ),
    "arc_easy": (  # ARC-Easy-Test.jsonl
        ["Question: Which statement best explains why photosynthesis is the foundation of most food webs?"
         "\nAnswer:"],
        [
            " Sunlight is the source of energy for nearly all ecosystems.",
            " Most ecosystems are found on land instead of in water.",
            " Carbon dioxide is more available than other gases.",
            " The producers in all ecosystems are plants.",
        ],
        0,  # answerKey "A"
    ),
    "arc_challenge": (  # ARC-Challenge-Test.jsonl
        ["Question: An astronomer observes that a planet rotates faster after a meteorite impact. Which "
         "is the most likely effect of this increase in rotation?\nAnswer:"],
        [
            " Planetary density will decrease.",
            " Planetary years will become longer.",
            " Planetary days will become shorter.",
            " Planetary gravity will become stronger.",
        ],
        2,  # answerKey "C"
    ),
    "openbookqa": (
        ["A person wants to start saving money so that they can afford a nice vacation at the end of the "
         "year. After looking over their budget and expenses, they decide the best way to save money is to"],
        [" make more phone calls", " quit eating lunch out", " buy less with monopoly money",
         " have lunch with friends"],
        1,  # answerKey "B"
    ),
}


def test_seven_tasks_registered() -> None:
    assert set(TASK_NAMES) == set(EXPECTED_FIRST)


@pytest.mark.parametrize("task", sorted(EXPECTED_FIRST))
def test_first_item_prompt(task: str, zs_dir: Path) -> None:
    (item,) = load_task(task, limit=1, data_dir=zs_dir)
    contexts, continuations, label = EXPECTED_FIRST[task]
    assert item == MultipleChoiceItem(task, 0, contexts, continuations, label)


def test_winogrande_pairs_share_continuation(zs_dir: Path) -> None:
    (item,) = load_task("winogrande", limit=1, data_dir=zs_dir)
    assert item.pairs() == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    ]


def test_local_files_and_label_file(zs_dir: Path) -> None:
    files = local_task_files("arc_easy", data_dir=zs_dir)
    assert {s: p.name for s, p in files.items()} == {
        "test": "ARC-Easy-Test.jsonl", "validation": "ARC-Easy-Dev.jsonl"
    }
    # piqa/valid-labels.lst starts 0, 1, 1
    assert [item.label for item in load_task("piqa", limit=3, data_dir=zs_dir)] == [0, 1, 1]
    # ARC items with numeric answer keys and 3 or 5 choices all load.
    items = load_task("arc_challenge", data_dir=zs_dir)
    assert len(items) == 1172
    assert {item.n_choices for item in items} == {3, 4, 5}


def test_hellaswag_preprocess() -> None:
    assert hellaswag_preprocess("  A [title] B [step] c  d ") == "A. B c d"
    assert hellaswag_preprocess("x [header] y") == "x y"


def test_hub_forms(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without local files, records come from datasets.load_dataset in their hub structure."""
    rows = {
        "Rowan/hellaswag": {"activity_label": "Roof shingle removal", "ctx_a": "A man is on a roof.",
                            "ctx_b": "he", "ctx": "unused", "endings": ["is up [step] there.", "b"],
                            "label": "0"},
        "allenai/ai2_arc": {"question": "Why?", "choices": {"text": ["x", "y"], "label": ["1", "2"]},
                            "answerKey": "2"},
        "allenai/openbookqa": {"question_stem": "Fog is near", "choices": {"text": ["a marsh", "sea"],
                               "label": ["A", "B"]}, "answerKey": "A"},
        "aps/super_glue": {"question": "is it", "passage": "P.", "idx": 0, "label": 1},
    }
    calls: list[tuple[str, str | None, str]] = []

    def fake_load_dataset(path: str, name: str | None = None, *, split: str) -> list[dict[str, Any]]:
        calls.append((path, name, split))
        return [rows[path]]

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
    (tmp_path / "zeroshot").mkdir()  # a data folder without the tasks
    (hs,) = load_task("hellaswag", data_dir=tmp_path)
    assert hs.contexts == ["Roof shingle removal: A man is on a roof. He"]
    assert hs.continuations == [" is up there.", " b"] and hs.label == 0
    (arc,) = load_task("arc_challenge", limit=5, data_dir=tmp_path)
    assert arc.contexts == ["Question: Why?\nAnswer:"] and arc.continuations == [" x", " y"]
    assert arc.label == 1
    (obqa,) = load_task("openbookqa", data_dir=tmp_path)
    assert obqa.contexts == ["Fog is near"] and obqa.continuations == [" a marsh", " sea"]
    (boolq,) = load_task("boolq", data_dir=tmp_path)
    assert boolq.contexts == ["P.\nQuestion: is it?\nAnswer:"] and boolq.label == 1
    assert calls == [
        ("Rowan/hellaswag", None, "validation"),
        ("allenai/ai2_arc", "ARC-Challenge", "test[:5]"),
        ("allenai/openbookqa", "main", "test"),
        ("aps/super_glue", "boolq", "validation"),
    ]


# --------------------------------------------------------------------------- (d) limit and errors


def test_limit_takes_first_items(zs_dir: Path) -> None:
    everything = load_task("hellaswag", data_dir=zs_dir)
    first = load_task("hellaswag", limit=5, data_dir=zs_dir)
    assert len(everything) == 10042
    assert first == everything[:5]
    assert [item.index for item in first] == [0, 1, 2, 3, 4]
    assert len(load_task("openbookqa", limit=10_000, data_dir=zs_dir)) == 500


@pytest.mark.parametrize("limit", [0, -1, 2.5])
def test_bad_limit(limit: Any, zs_dir: Path) -> None:
    with pytest.raises(ConfigError, match="limit"):
        load_task("piqa", limit=limit, data_dir=zs_dir)


def test_unknown_task_lists_choices() -> None:
    with pytest.raises(ConfigError, match="'mmlu' is unknown") as info:
        load_task("mmlu")
    for name in TASK_NAMES:
        assert name in str(info.value)
    assert get_task("ARC-Easy").name == "arc_easy"


def test_offline_missing_local_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "zeroshot" / "piqa").mkdir(parents=True)
    with pytest.raises(ConfigError) as info:
        load_task("piqa", data_dir=tmp_path)
    message = str(info.value)
    assert "'piqa'" in message and "offline" in message
    assert str(tmp_path / "zeroshot" / "piqa") in message and "valid.jsonl" in message


def test_unknown_task_stops_evaluate_tasks_before_scoring() -> None:
    with pytest.raises(ConfigError, match="unknown"):
        evaluate_tasks(None, None, ["piqa", "nope"])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- (e) tokens and batches


def test_encode_pair_keeps_bos_on_context(tokenizer: Any) -> None:
    a, b, c, space = (tokenizer.convert_tokens_to_ids(t) for t in ("a", "b", "c", " "))
    # the trailing space of the context moves to the continuation
    assert encode_pair(tokenizer, "ab ", "c") == ([BOS, a, b], [space, c])
    assert encode_pair(tokenizer, "ab", " c") == ([BOS, a, b], [space, c])
    assert encode_pair(tokenizer, "", "c") == ([BOS], [c])
    assert encode_pair(tokenizer, "ab", " c", prefix=[]) == ([a, b], [space, c])


class _MergingTokenizer:
    """Greedy longest-match over {"ab", "a", "b", "c"} (else <unk>=0); BOS=1 when special tokens are added."""

    vocab = {"ab": 5, "a": 6, "b": 7, "c": 8}
    bos_token_id, eos_token_id, pad_token_id = 1, 2, None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids, i = [], 0
        while i < len(text):
            step = 2 if text[i : i + 2] in self.vocab else 1
            ids.append(self.vocab.get(text[i : i + step], 0))
            i += step
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def test_encode_pair_takes_tail_of_whole_encoding() -> None:
    # "a" alone is [6]; "abc" whole is [5, 8]; the continuation is the tail after one token: [8].
    assert encode_pair(_MergingTokenizer(), "a", "bc") == ([1, 6], [8])
    assert scoring._pad_id(_MergingTokenizer()) == 2  # no pad token: EOS pads


def test_build_batches_order_padding_mask() -> None:
    encoded = [([1, 10, 11], [12, 13]), ([1, 20], [21]), ([1, 30, 31, 32, 33], [34, 35, 36])]
    first, last = build_batches(encoded, batch_size=2, pad_token_id=PAD)
    assert first.request_indices == [0, 1] and last.request_indices == [2]
    # the last continuation token is only a target: it is never fed to the model
    assert first.input_ids.tolist() == [[1, 10, 11, 12], [1, 20, PAD, PAD]]
    assert first.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert first.logit_spans == [(2, 4), (1, 2)] and first.targets == [[12, 13], [21]]
    assert last.input_ids.tolist() == [[1, 30, 31, 32, 33, 34, 35]]
    assert last.attention_mask.tolist() == [[1] * 7]
    assert last.logit_spans == [(4, 7)] and last.targets == [[34, 35, 36]]


def test_build_batches_left_truncation_as_the_harness() -> None:
    # lm-evaluation-harness: input = (context + continuation)[-(max_length + 1):][:-1]
    encoded = [([1, 30, 31, 32, 33], [34, 35, 36]), ([1, 20], [21])]
    (batch,) = build_batches(encoded, batch_size=4, pad_token_id=PAD, max_length=5)
    whole = [1, 30, 31, 32, 33, 34, 35, 36]
    assert batch.input_ids.tolist()[0] == whole[-(5 + 1):][:-1] == [31, 32, 33, 34, 35]
    assert batch.input_ids.tolist()[1] == [1, 20, PAD, PAD, PAD]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch.logit_spans == [(2, 5), (1, 2)]
    # a continuation of max_length tokens still fits: one context token stays in the input
    (edge,) = build_batches(encoded[:1], batch_size=1, pad_token_id=PAD, max_length=3)
    assert edge.input_ids.tolist() == [[33, 34, 35]] and edge.logit_spans == [(0, 3)]
    with pytest.raises(ConfigError, match="max_length"):
        build_batches(encoded, batch_size=4, pad_token_id=PAD, max_length=2)
    with pytest.raises(ConfigError, match="batch_size"):
        build_batches(encoded, batch_size=0, pad_token_id=PAD)


def test_make_requests_order() -> None:
    items = [
        MultipleChoiceItem("t", 0, ["c0"], [" x", " y"], 0),
        MultipleChoiceItem("t", 1, ["c1a", "c1b"], [" z"], 1),
    ]
    assert make_requests(items) == [
        Request(0, 0, "c0", " x"), Request(0, 1, "c0", " y"),
        Request(1, 0, "c1a", " z"), Request(1, 1, "c1b", " z"),
    ]


# --------------------------------------------------------------------------- (b) scoring vs. hand computation


def _reference_logprob(model: Any, tokenizer: Any, context: str, continuation: str) -> float:
    """Unpadded forward of BOS + context + continuation; sum log-probs of the continuation characters."""
    ids = tokenizer(context + continuation).input_ids  # char tokenizer: one token per character
    assert len(ids) == 1 + len(context) + len(continuation)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    log_probs = torch.log_softmax(logits, dim=-1)
    total = 0.0
    for position in range(len(ids) - len(continuation), len(ids)):
        total += float(log_probs[position - 1, ids[position]])
    return total


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_score_matches_hand_computation(family: str, tokenizer: Any) -> None:
    model = tiny_model(family)
    short = ("Question: Is it?\nAnswer:", " yes")
    long = ("Question: Which statement explains photosynthesis best of all?\nAnswer:", " Sunlight.")
    expected = [_reference_logprob(model, tokenizer, *pair) for pair in (short, long)]
    # short first: its row is right-padded up to the long row
    scores = score_requests(model, tokenizer, [short, long], batch_size=2, progress=False)
    assert scores == pytest.approx(expected, abs=1e-4)
    single = score_requests(model, tokenizer, [Request(0, 0, *short)], batch_size=1, progress=False)
    assert single == pytest.approx(expected[:1], abs=1e-4)
    assert all(score < 0 for score in scores)


def test_score_with_left_truncation(llama: Any, tokenizer: Any) -> None:
    context, continuation = "abcdefghij", " kl"
    # inputs of 8 tokens, the last one ("l") only a target: "efghij k" + "l" (BOS and "abcd" dropped)
    ids = [tokenizer.convert_tokens_to_ids(ch) for ch in "efghij kl"]
    with torch.no_grad():
        log_probs = torch.log_softmax(llama(input_ids=torch.tensor([ids[:-1]])).logits[0].double(), dim=-1)
    expected = sum(float(log_probs[p - 1, ids[p]]) for p in range(6, 9))
    (score,) = score_requests(llama, tokenizer, [(context, continuation)], 1, max_length=8, progress=False)
    assert score == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize(
    ("methods", "explicit", "expected"),
    [
        ([], None, 8192),  # dense only: the model's context, as lm-evaluation-harness truncates
        ([{"preset": "magnitude", "pruning": {"ratio": 0.4}}], None, 8192),  # no calibrated history
        ([{"preset": "pp"}], None, 512),  # a calibrated history ends at calibration.seq_len: every row
        ([{"preset": "pp"}], 300, 300),  # explicit
    ],
)
def test_request_max_length_defaults_to_model_context(
    methods: list[Any], explicit: Any, expected: int
) -> None:
    from ppframework.config import RunConfig
    from ppframework.evaluate import request_max_length

    cfg = RunConfig.model_validate({"methods": methods, "data": {"seq_len": 512}})
    assert request_max_length(cfg, explicit, 8192) == expected
    assert request_max_length(RunConfig.model_validate({"methods": []}), None, None) is None  # no limit


def test_max_length_beyond_calibrated_positions_fails_early_under_beyond_refuse() -> None:
    from ppframework.config import RunConfig
    from ppframework.evaluate import check_tasks

    evaluation = {"zeroshot": {"max_length": 1024}}
    refuse = [{"preset": "pp", "history": {"beyond": "refuse"}}]
    cfg = RunConfig.model_validate({"data": {"seq_len": 128}, "evaluation": evaluation, "methods": refuse})
    with pytest.raises(ConfigError, match=r"evaluation\.zeroshot\.max_length: 1024 tokens exceed"):
        check_tasks(cfg)
    # the default (history.beyond: extend) runs longer requests on an extended history
    check_tasks(RunConfig.model_validate({"data": {"seq_len": 128}, "evaluation": evaluation}))
    check_tasks(RunConfig.model_validate({"methods": [], "evaluation": {"zeroshot": {"max_length": 1024}}}))


# --------------------------------------------------------------------------- (c) acc / acc_norm


def test_acc_norm_divides_by_choice_characters_without_delimiter(monkeypatch: pytest.MonkeyPatch) -> None:
    # lm-evaluation-harness 0.4: acc_norm = argmax(ll / len(choice)), the choice text without the " "
    # delimiter, in characters. " ééé": choice "ééé" = 3 characters (7 UTF-8 bytes with the space);
    # " abcde": "abcde" = 5 characters (6 bytes with the space).
    assert continuation_length(" ééé") == 3 and continuation_length(" abcde") == 5
    assert continuation_length("  x") == 2  # only the one delimiter space goes
    item = MultipleChoiceItem("t", 0, ["ctx"], [" ééé", " abcde"], 1)
    # Per character: -3/3 = -1.0 < -2.8/5 = -0.56 -> choice 1 (right). The old divisor (bytes with the
    # space) gives -3/7 = -0.43 > -2.8/6 = -0.47 -> choice 0.
    fixed = [-3.0, -2.8]

    def fake_scores(_model: Any, _tok: Any, requests: Sequence[Request], *_: Any, **__: Any) -> list[float]:
        assert [(r.context, r.continuation) for r in requests] == [("ctx", " ééé"), ("ctx", " abcde")]
        return fixed

    monkeypatch.setattr(scoring, "score_requests", fake_scores)
    result = evaluate_items(None, None, [item], progress=False)  # type: ignore[arg-type]
    assert (result.acc, result.acc_norm, result.n_items, result.task) == (1.0, 1.0, 1, "t")


def test_acc_norm_only_where_the_harness_reports_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # The stock harness BoolQ and WinoGrande tasks report acc only: so does the scorer.
    assert get_task("boolq").metrics == ("acc",) and get_task("winogrande").metrics == ("acc",)
    assert all(get_task(t).metrics == ("acc", "acc_norm") for t in ("piqa", "hellaswag", "arc_easy",
                                                                     "arc_challenge", "openbookqa"))

    def fake_scores(_model: Any, _tok: Any, requests: Sequence[Request], *_: Any, **__: Any) -> list[float]:
        return [-1.0, -2.0][: len(requests)]

    monkeypatch.setattr(scoring, "score_requests", fake_scores)
    boolq = MultipleChoiceItem("boolq", 0, ["p\nQuestion: q?\nAnswer:"], [" no", " yes"], 0)
    result = evaluate_items(None, None, [boolq], progress=False)  # type: ignore[arg-type]
    assert result.acc == 1.0 and result.acc_norm is None
    piqa = MultipleChoiceItem("piqa", 0, ["Question: g\nAnswer:"], [" a", " bb"], 0)
    assert evaluate_items(None, None, [piqa], progress=False).acc_norm is not None  # type: ignore[arg-type]


def test_average_accuracy() -> None:
    results = [TaskResult("a", 10, 0.5, 0.25, 1.0), TaskResult("b", 5, 1.0, 0.75, 1.0)]
    assert average_accuracy(results) == pytest.approx(0.75)
    assert average_accuracy(results, metric="acc_norm") == pytest.approx(0.5)
    # acc_norm averages only the tasks that report it
    with_boolq = [*results, TaskResult("boolq", 5, 0.0, None, 1.0)]
    assert average_accuracy(with_boolq, metric="acc_norm") == pytest.approx(0.5)
    assert average_accuracy(with_boolq) == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="metric"):
        average_accuracy(results, metric="f1")
    with pytest.raises(ConfigError):
        average_accuracy([])


def test_evaluate_tasks_end_to_end(llama: Any, tokenizer: Any, zs_dir: Path) -> None:
    results = evaluate_tasks(
        llama, tokenizer, ["winogrande", "boolq"], limit=3, batch_size=4, data_dir=zs_dir,
        max_length=200, progress=False,
    )
    assert [r.task for r in results] == ["winogrande", "boolq"]
    for result in results:
        assert result.n_items == 3 and result.seconds > 0
        assert result.acc * 3 in (0, 1, 2, 3) and result.acc_norm is None  # acc only, as the harness
    winogrande = results[0]
    # batch size does not change the scores (fixed order, right padding)
    again = evaluate_task(llama, tokenizer, "winogrande", limit=3, batch_size=1, data_dir=zs_dir,
                          progress=False)
    assert math.isclose(again.acc, winogrande.acc)
