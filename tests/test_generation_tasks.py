"""Generation tasks (HumanEval, MBPP, XSum): loading, prompts, scoring; batched generation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ppframework.errors import ConfigError
from ppframework.generation.runner import generate_completions
from ppframework.generation.tasks import (
    GENERATION_TASKS,
    XSUM_TEMPLATE,
    GenerationItem,
    get_generation_task,
)
from ppframework.testing.tiny import tiny_model, tiny_tokenizer

# ---------------------------------------------------------------------------------------------- loading


def test_humaneval_loads_all_items(shared_data_dir: Path) -> None:
    task = get_generation_task("humaneval")
    items = task.load(shared_data_dir)
    assert len(items) == 164
    first = items[0]
    assert first.task == "humaneval" and first.item_id == "HumanEval/0"
    assert first.prompt.startswith("from typing import List\n\n\ndef has_close_elements(")
    assert first.prompt.endswith('"""')  # stripped, as bigcode's default humaneval task
    assert first.reference["entry_point"] == "has_close_elements"
    assert "def check(candidate)" in first.reference["test"]
    assert [it.item_id for it in task.load(shared_data_dir, limit=3)] == [f"HumanEval/{i}" for i in range(3)]


def test_mbpp_loads_test_split_with_bigcode_prompt(shared_data_dir: Path) -> None:
    task = get_generation_task("mbpp")
    items = task.load(shared_data_dir)
    assert len(items) == 500
    assert [items[0].item_id, items[-1].item_id] == ["11", "510"]
    assert items[0].prompt == (
        '"""\nWrite a python function to remove first and last occurrence of a given character from the '
        'string.\nassert remove_Occ("hello","l") == "heo"\n"""\n'
    )
    assert all("\r" not in it.reference["code"] and "\r" not in it.prompt for it in items)
    assert len(items[0].reference["test_list"]) == 3
    assert len(task.load(shared_data_dir, limit=7)) == 7


def test_xsum_loads_items(shared_data_dir: Path) -> None:
    task = get_generation_task("xsum")
    items = task.load(shared_data_dir)
    assert len(items) == 1000
    first = items[0]
    assert first.item_id == "34268361"
    assert first.reference["summary"].startswith("Proposals for an indoor water park")
    assert first.prompt.startswith("Article: ") and first.prompt.endswith(
        "\n\nSummarize the article above in one sentence.\nSummary:"
    )
    assert first.reference["truncated"] is False
    assert len(task.load(shared_data_dir, limit=5)) == 5


def test_missing_file_and_unknown_task_raise_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"generation/mbpp/test\.jsonl"):
        get_generation_task("mbpp").load(tmp_path)
    with pytest.raises(ConfigError) as info:
        get_generation_task("gsm8k")
    for name in GENERATION_TASKS:
        assert name in str(info.value)


def test_prompt_token_counts_and_xsum_truncation(shared_data_dir: Path) -> None:
    tok = tiny_tokenizer()  # one token per character + BOS
    he = get_generation_task("humaneval").load(shared_data_dir, limit=2, tokenizer=tok)
    assert he[0].reference["prompt_tokens"] == len(he[0].prompt) + 1
    full = get_generation_task("xsum").load(shared_data_dir, limit=3)
    cut = get_generation_task("xsum").load(shared_data_dir, limit=3, tokenizer=tok, max_prompt_tokens=200)
    suffix = XSUM_TEMPLATE.split("{document}")[1]
    for whole, item in zip(full, cut, strict=True):
        assert item.reference["truncated"] is True
        assert item.reference["prompt_tokens"] <= 200
        assert item.reference["prompt_tokens"] >= 195  # the longest prefix (minus trailing spaces)
        assert item.prompt.endswith(suffix)
        document = item.prompt[len("Article: ") : -len(suffix)]
        assert whole.prompt.startswith("Article: " + document)
        assert len(document) < len(whole.prompt)
    loose = get_generation_task("xsum").load(shared_data_dir, limit=1, tokenizer=tok, max_prompt_tokens=10**6)
    assert loose[0].prompt == full[0].prompt and loose[0].reference["truncated"] is False
    with pytest.raises(ConfigError, match="instruction alone"):
        get_generation_task("xsum").load(shared_data_dir, limit=1, tokenizer=tok, max_prompt_tokens=20)


def test_postprocess_cuts_at_the_first_stop_string() -> None:
    he = get_generation_task("humaneval")
    item = GenerationItem("humaneval", "x", "def f():\n", {})
    body = "    return 1\n"
    assert he.postprocess(item, body + "\ndef g():\n    pass\n") == body
    assert he.postprocess(item, body + "\nprint(f())\n#x") == body
    assert he.postprocess(item, "    if x:\n        return 2\n") == "    if x:\n        return 2\n"
    mbpp = get_generation_task("mbpp")
    assert mbpp.postprocess(item, "def f(a):\n  return a\nassert f(1) == 1\n") == "def f(a):\n  return a"
    xsum = get_generation_task("xsum")
    assert xsum.postprocess(item, "  A short summary. \nMore text") == "A short summary."


# ---------------------------------------------------------------------------------------------- scoring


def test_humaneval_canonical_solutions_pass_and_wrong_completion_fails(shared_data_dir: Path) -> None:
    task = get_generation_task("humaneval")
    items = task.load(shared_data_dir, limit=5)
    # the model continues the stripped prompt, so its body starts with the newline the strip removed
    solutions = ["\n" + it.reference["canonical_solution"] for it in items]
    score = task.score(items, solutions, workers=2)
    assert score.metrics == {"pass@1": 1.0} and score.n_items == 5
    assert all(row["status"] == "passed" for row in score.per_item)
    wrong = task.score(items[:2], ["\n    return None\n", solutions[1]])
    assert wrong.metrics["pass@1"] == 0.5
    assert [row["passed"] for row in wrong.per_item] == [False, True]


def test_mbpp_reference_code_passes(shared_data_dir: Path) -> None:
    task = get_generation_task("mbpp")
    items = task.load(shared_data_dir, limit=5)
    score = task.score(items, [it.reference["code"] for it in items], workers=2)
    assert score.metrics["pass@1"] == 1.0, score.per_item
    wrong = task.score(items[:1], ["def remove_Occ(s, ch):\n    return s\n"])
    assert wrong.metrics["pass@1"] == 0.0


def test_mbpp_setup_code_runs_after_the_solution(shared_data_dir: Path) -> None:
    task = get_generation_task("mbpp")
    item = next(it for it in task.load(shared_data_dir) if it.item_id == "367")
    assert "Node(1)" in item.reference["test_setup_code"]
    assert task.score([item], [item.reference["code"]]).metrics["pass@1"] == 1.0


def test_xsum_rouge_matches_hand_computed_values() -> None:
    task = get_generation_task("xsum")
    item = GenerationItem("xsum", "1", "p", {"summary": "The cat sat on the mat."})
    same = task.score([item], [" The cat sat on the mat.\nignored"])
    assert same.metrics == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    # the cat lay on the rug: unigram overlap 4 of 6 each (the x2, cat, on), bigrams 2 of 5
    # (the cat, on the), LCS "the cat on the" = 4 -> F1 = 2/3, 2/5, 2/3.
    near = task.score([item], ["The cat lay on the rug."])
    assert near.metrics == pytest.approx({"rouge1": 2 / 3, "rouge2": 0.4, "rougeL": 2 / 3})
    far = task.score([item], ["Stock markets fell sharply in Tokyo."])
    assert far.metrics["rouge1"] == 0.0 and far.metrics["rougeL"] == 0.0
    assert near.per_item[0]["summary"] == "The cat lay on the rug."


def test_xsum_reference_against_itself_is_one(shared_data_dir: Path) -> None:
    task = get_generation_task("xsum")
    items = task.load(shared_data_dir, limit=4)
    score = task.score(items, [it.reference["summary"] for it in items])
    assert score.metrics == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    shuffled = task.score(items, [items[(i + 1) % 4].reference["summary"] for i in range(4)])
    assert shuffled.metrics["rouge2"] < 0.2


# ------------------------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def llama_and_tokenizer() -> tuple[Any, Any]:
    return tiny_model("llama"), tiny_tokenizer()


PROMPTS = ["def f(x):\n", "Hello there, this is a somewhat longer prompt.", "abc", "Summary: the"]


def test_left_padding_gives_the_same_greedy_completion_as_alone(llama_and_tokenizer: tuple[Any, Any]) -> None:
    model, tok = llama_and_tokenizer
    batched = generate_completions(model, tok, PROMPTS, batch_size=4, max_new_tokens=12, stop=[])
    alone = [
        generate_completions(model, tok, [p], batch_size=1, max_new_tokens=12, stop=[]).completions[0]
        for p in PROMPTS
    ]
    assert batched.completions == alone
    assert len(set(batched.completions)) > 1  # the prompts really differ in what they produce
    assert tok.padding_side == "right"  # the caller's tokenizer is left as it was
    assert batched.new_tokens == [12] * 4 and batched.decode_steps == [11]
    assert batched.prompt_tokens == [len(p) + 1 for p in PROMPTS]
    assert batched.prefill_s > 0 and batched.decode_s > 0 and batched.decode_tokens_per_s > 0
    assert batched.decode_tokens == 4 * 11


def test_fixed_order_and_stop_strings(llama_and_tokenizer: tuple[Any, Any]) -> None:
    model, tok = llama_and_tokenizer
    forward = generate_completions(model, tok, PROMPTS, batch_size=3, max_new_tokens=12, stop=[])
    assert forward.batch_sizes == [3, 1] and len(forward.prefill_seconds) == 2
    backward = generate_completions(model, tok, PROMPTS[::-1], batch_size=3, max_new_tokens=12, stop=[])
    assert backward.completions[::-1] == forward.completions
    # Stop at a character the first completion produces: generation stops there and the text is cut.
    text = forward.completions[0]
    stop_char = next(c for c in text[1:] if c not in text[:1])
    cut = generate_completions(model, tok, PROMPTS[:1], batch_size=1, max_new_tokens=12, stop=[stop_char])
    assert cut.completions[0] == text[: text.index(stop_char)]
    assert cut.new_tokens[0] < 12


def test_empty_and_too_long_prompts_raise(llama_and_tokenizer: tuple[Any, Any]) -> None:
    model, tok = llama_and_tokenizer
    with pytest.raises(ConfigError, match="prompt 1 is empty"):
        generate_completions(model, tok, ["a", ""], batch_size=2, max_new_tokens=4, stop=[])
    with pytest.raises(ConfigError, match=r"prompt 1 has 251 tokens.*max_position_embeddings=256"):
        generate_completions(model, tok, ["a", "x" * 250], batch_size=2, max_new_tokens=8, stop=[])


def test_xsum_summary_that_starts_on_a_new_line_is_kept() -> None:
    task = get_generation_task("xsum")
    item = GenerationItem("xsum", "1", "Article: x\n\nSummary:", {"summary": "a b"})
    assert task.postprocess(item, "\n\n A river rose.\nMore text") == "A river rose."
    assert task.postprocess(item, " A river rose.") == "A river rose."


def test_stop_after_text_ignores_stop_strings_in_leading_whitespace() -> None:
    from ppframework.generation.runner import StopAfterText

    tok = tiny_tokenizer()
    prompt = tok("ab")["input_ids"]
    rows = [
        prompt + tok("\n\nxy", add_special_tokens=False)["input_ids"],
        prompt + tok("\nx\nyz", add_special_tokens=False)["input_ids"],
    ]
    width = min(len(r) for r in rows)
    rows = [r[:width] for r in rows]  # same length: "\n\nxy"[:n] vs "\nx\nyz"[:n]
    criterion = StopAfterText(tok, ["\n"], len(prompt))
    done = criterion(torch.tensor(rows), None)
    assert done.tolist() == [False, True]


def test_xsum_uses_the_chat_template_when_the_tokenizer_has_one(shared_data_dir: Path) -> None:
    task = get_generation_task("xsum")
    tok = tiny_tokenizer()
    plain = task.load(shared_data_dir, limit=1, tokenizer=tok)[0]
    assert plain.prompt.endswith("Summary:")
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}[end]{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    chat = task.load(shared_data_dir, limit=2, tokenizer=tok, max_prompt_tokens=200)
    assert chat[0].prompt.startswith("[user]Summarize the following article in one sentence.\n\nArticle: ")
    assert all(it.prompt.endswith("[end][assistant]") for it in chat)
    assert all(it.reference["prompt_tokens"] <= 200 and it.reference["truncated"] for it in chat)
