"""Tests for ppframework.data: loading text data sets, tokenising, windows, calibration and batches."""

from __future__ import annotations

import json
import logging
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ppframework.data import (
    KNOWN_DATASETS,
    DataError,
    batched,
    calibration_windows,
    load_corpus_text,
    load_documents,
    make_windows,
    resolve_data_dir,
    tokenize_text,
)

WIKI_FILE = "wikitext-2-raw-v1/wiki.test.raw"
C4_FILE = "c4/c4-validation-2k.parquet"
N_WORDS = 400
BOS_ID = 1


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def shared_data(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The shared data folder found by the default resolution (tests run from the repo root)."""
    monkeypatch.delenv("PPF_DATA_DIR", raising=False)
    folder = resolve_data_dir(None)
    if folder is None or not (folder / WIKI_FILE).is_file() or not (folder / C4_FILE).is_file():
        pytest.skip("shared data folder (../shared/data with wikitext-2 and c4) is absent")
    return folder


@pytest.fixture(scope="module")
def word_tokenizer() -> Any:
    """A tiny whitespace word-level tokenizer: words w0..w399, '<s>' (BOS, id 1) added at the start."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": BOS_ID, **{f"w{i}": i + 2 for i in range(N_WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", unk_token="<unk>", model_max_length=16
    )


class CountingTokenizer:
    """A duck-typed tokenizer wrapper that counts calls (not a transformers tokenizer)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0

    def __call__(self, text: str, **kwargs: Any) -> Any:
        self.calls += 1
        return self.inner(text, **kwargs)


def words(start: int, count: int) -> str:
    return " ".join(f"w{i}" for i in range(start, start + count))


def contains_slice(haystack: torch.Tensor, needle: torch.Tensor) -> bool:
    n = needle.numel()
    return any(torch.equal(haystack[i : i + n], needle) for i in range(haystack.numel() - n + 1))


# --------------------------------------------------------------------------- data folder


def test_explicit_missing_data_dir_names_the_config_field(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data.data_dir"):
        resolve_data_dir(tmp_path / "missing")


def test_env_data_dir_pointing_to_missing_folder_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PPF_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(DataError, match="PPF_DATA_DIR"):
        resolve_data_dir(None)


def test_env_data_dir_is_used_when_no_explicit_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PPF_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path.resolve()
    other = tmp_path / "other"
    other.mkdir()
    assert resolve_data_dir(other) == other.resolve()


def test_default_data_dir_found_from_repo_root_when_cwd_elsewhere(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_data_dir(None) == shared_data


# --------------------------------------------------------------------------- known data sets


def test_wikitext2_local_text_joins_non_empty_lines_with_blank_lines(shared_data: Path) -> None:
    text = load_corpus_text("wikitext2", "test", shared_data)
    assert text.startswith(" = Robert Boulter = \n\n Robert Boulter is an English film")
    raw = (shared_data / WIKI_FILE).read_text(encoding="utf-8")
    lines = [line for line in raw.split("\n") if line.strip()]
    assert len(lines) == 2891
    assert text == "\n\n".join(lines)
    assert "\r" not in text and "\n\n\n" not in text


def test_wikitext2_default_data_dir_matches_explicit(shared_data: Path) -> None:
    assert load_corpus_text("wikitext2") == load_corpus_text("wikitext2", "test", shared_data)


def test_c4_local_has_2000_documents(shared_data: Path) -> None:
    documents = load_documents("c4", "validation", shared_data)
    assert len(documents) == 2000
    assert all(isinstance(doc, str) and doc.strip() for doc in documents)
    assert load_corpus_text("c4", "validation", shared_data) == "\n\n".join(documents)


def test_c4_other_split_errors(shared_data: Path) -> None:
    with pytest.raises(DataError, match="data.split.*validation"):
        load_corpus_text("c4", "test", shared_data)


def test_wikitext2_bad_split_lists_the_splits(shared_data: Path) -> None:
    with pytest.raises(DataError, match="data.split.*train, validation, test"):
        load_documents("wikitext2", "dev", shared_data)


def fake_datasets(monkeypatch: pytest.MonkeyPatch, load_dataset: Any) -> None:
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)


def test_wikitext2_falls_back_to_hub_and_joins_like_the_local_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def load_dataset(*args: Any, **kwargs: Any) -> dict[str, list[str]]:
        calls.append((args, kwargs))
        return {"text": ["", " = Title = \n", "", " A paragraph . \n", " \n"]}

    fake_datasets(monkeypatch, load_dataset)
    text = load_corpus_text("wikitext2", "validation", tmp_path)
    assert text == " = Title = \n\n A paragraph . "
    assert calls == [(("wikitext", "wikitext-2-raw-v1"), {"split": "validation"})]


def test_c4_hub_fallback_uses_the_first_validation_shard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def load_dataset(*args: Any, **kwargs: Any) -> dict[str, list[str]]:
        calls.append((args, kwargs))
        return {"text": ["doc one", "doc two"]}

    fake_datasets(monkeypatch, load_dataset)
    assert load_documents("c4", "validation", tmp_path) == ["doc one", "doc two"]
    files = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
    assert calls == [(("allenai/c4",), {"data_files": files, "split": "validation"})]


def test_unreachable_hub_error_gives_the_expected_local_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def load_dataset(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("offline")

    fake_datasets(monkeypatch, load_dataset)
    with pytest.raises(DataError) as info:
        load_corpus_text("wikitext2", "test", tmp_path)
    message = str(info.value)
    assert str(tmp_path.resolve() / WIKI_FILE) in message
    assert "PPF_DATA_DIR" in message and "data.data_dir" in message and "unreachable" in message


def test_unknown_name_lists_the_choices(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_corpus_text(str(tmp_path / "no-such-dataset"))
    message = str(info.value)
    assert "data.name" in message
    for choice in (*KNOWN_DATASETS, ".txt", ".raw", ".jsonl", ".json", ".parquet"):
        assert choice in message


def test_existing_file_with_unsupported_extension_errors(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"data.name.*\.csv"):
        load_corpus_text(str(path))


# --------------------------------------------------------------------------- local files


def test_local_txt_joins_non_empty_lines_and_strips_carriage_returns(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"first line\r\n\r\n second \r\n   \n\nthird")
    assert load_corpus_text(str(path)) == "first line\n\n second \n\nthird"
    assert load_documents(str(path), "test", None) == ["first line", " second ", "third"]


def test_local_raw_file_is_read_like_txt(tmp_path: Path) -> None:
    path = tmp_path / "wiki.raw"
    path.write_text(" = A = \n\n body \n")
    assert load_corpus_text(str(path)) == " = A = \n\n body "


def test_local_jsonl_text_column(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    rows = [{"text": "alpha", "id": 1}, {"text": "", "id": 2}, {"text": "beta\ngamma", "id": 3}]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    assert load_corpus_text(str(path)) == "alpha\n\nbeta\ngamma"
    assert load_documents(str(path), "test", None) == ["alpha", "beta\ngamma"]


def test_local_json_array_text_column(tmp_path: Path) -> None:
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps([{"text": "one"}, {"text": "two"}]))
    assert load_corpus_text(str(path)) == "one\n\ntwo"


def test_local_parquet_text_column(tmp_path: Path) -> None:
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": ["x y", "z"], "url": ["u1", "u2"]}), path)
    assert load_corpus_text(str(path)) == "x y\n\nz"


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_missing_text_column_names_the_columns_found(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"corpus{suffix}"
    if suffix == ".parquet":
        pq.write_table(pa.table({"body": ["a"], "label": [0]}), path)
    else:
        path.write_text(json.dumps({"body": "a", "label": 0}) + "\n")
    with pytest.raises(DataError) as info:
        load_corpus_text(str(path))
    message = str(info.value)
    assert "'text'" in message and "body" in message and "label" in message


# --------------------------------------------------------------------------- tokenisation


def test_tokenize_text_adds_one_bos_at_the_start(word_tokenizer: Any) -> None:
    ids = tokenize_text(words(0, 5) + "\n\n" + words(5, 3), word_tokenizer)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.tolist() == [BOS_ID, *range(2, 10)]


class RecordingHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_log() -> Iterator[RecordingHandler]:
    """Messages logged by transformers (its logger does not propagate to the root logger)."""
    handler = RecordingHandler()
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)
    yield handler
    transformers_logger.removeHandler(handler)


def test_tokenize_large_text_without_length_warning(
    shared_data: Path, word_tokenizer: Any, transformers_log: RecordingHandler
) -> None:
    text = load_corpus_text("wikitext2", "test", shared_data)
    ids = tokenize_text(text, word_tokenizer)
    assert ids.numel() > 100_000 > word_tokenizer.model_max_length
    assert int((ids == BOS_ID).sum()) == 1 and int(ids[0]) == BOS_ID
    assert not any("longer than the specified maximum" in message for message in transformers_log.messages)


# --------------------------------------------------------------------------- windows

window_cases = st.tuples(
    st.integers(min_value=1, max_value=300),  # n tokens
    st.integers(min_value=1, max_value=64),  # seq_len
    st.integers(min_value=0, max_value=2**31 - 1),  # seed
    st.one_of(st.none(), st.integers(min_value=1, max_value=20)),  # max_windows
).filter(lambda case: case[1] <= case[0])


@settings(max_examples=60, deadline=None)
@given(window_cases)
def test_contiguous_windows_are_ordered_non_overlapping_slices(
    case: tuple[int, int, int, int | None],
) -> None:
    n_tokens, seq_len, _, max_windows = case
    ids = torch.arange(n_tokens, dtype=torch.int32) * 7 + 3
    windows = make_windows(ids, seq_len, "contiguous", max_windows=max_windows)
    n_full = n_tokens // seq_len
    expected_n = n_full if max_windows is None else min(n_full, max_windows)
    assert windows.shape == (expected_n, seq_len) and windows.dtype == torch.long
    for i, window in enumerate(windows):
        assert torch.equal(window, ids[i * seq_len : (i + 1) * seq_len].long())


@settings(max_examples=60, deadline=None)
@given(window_cases)
def test_random_windows_are_seeded_slices(case: tuple[int, int, int, int | None]) -> None:
    n_tokens, seq_len, seed, max_windows = case
    ids = torch.arange(n_tokens) + 1000
    windows = make_windows(ids, seq_len, "random", seed=seed)
    assert windows.shape == (n_tokens // seq_len, seq_len) and windows.dtype == torch.long
    for window in windows:
        offset = int(window[0]) - 1000
        assert 0 <= offset <= n_tokens - seq_len
        assert torch.equal(window, ids[offset : offset + seq_len])
    assert torch.equal(windows, make_windows(ids, seq_len, "random", seed=seed))
    if max_windows is not None:
        assert torch.equal(
            make_windows(ids, seq_len, "random", seed=seed, max_windows=max_windows), windows[:max_windows]
        )


def test_random_windows_differ_between_seeds() -> None:
    ids = torch.arange(10_000)
    assert not torch.equal(make_windows(ids, 100, "random", seed=0), make_windows(ids, 100, "random", seed=1))


def test_too_short_text_names_seq_len() -> None:
    with pytest.raises(DataError, match="data.seq_len"):
        make_windows(torch.arange(10), 11)


def test_unknown_window_policy_lists_the_policies() -> None:
    with pytest.raises(DataError, match="contiguous, random"):
        make_windows(torch.arange(10), 5, "strided")


# --------------------------------------------------------------------------- calibration


CALIBRATION_DOCS = [words(0, 3), words(3, 5), words(10, 40), words(50, 4), words(100, 60), words(200, 2)]


def test_calibration_windows_come_from_long_documents(word_tokenizer: Any) -> None:
    seq_len = 10
    windows = calibration_windows(CALIBRATION_DOCS, word_tokenizer, n_samples=50, seq_len=seq_len, seed=3)
    assert windows.shape == (50, seq_len) and windows.dtype == torch.long
    long_docs = [torch.tensor(word_tokenizer(doc).input_ids) for doc in CALIBRATION_DOCS[2::2]]
    sources = []
    for window in windows:
        matches = [i for i, doc in enumerate(long_docs) if contains_slice(doc, window)]
        assert len(matches) == 1
        sources.append(matches[0])
    assert set(sources) == {0, 1}  # both long documents drawn (miss probability ~1e-15)


def test_calibration_windows_are_deterministic_by_seed(word_tokenizer: Any) -> None:
    def draw(seed: int) -> torch.Tensor:
        return calibration_windows(CALIBRATION_DOCS, word_tokenizer, n_samples=8, seq_len=10, seed=seed)

    assert torch.equal(draw(0), draw(0))
    assert any(not torch.equal(draw(0), draw(seed)) for seed in range(1, 5))


def test_calibration_tokenises_only_documents_it_draws(word_tokenizer: Any) -> None:
    counting = CountingTokenizer(word_tokenizer)
    documents = [words(i, 30) for i in range(200)]
    windows = calibration_windows(documents, counting, n_samples=1, seq_len=20, seed=0)
    assert windows.shape == (1, 20)
    assert counting.calls == 1


def test_calibration_without_long_documents_names_seq_len(word_tokenizer: Any) -> None:
    with pytest.raises(DataError, match=r"calibration.seq_len.*61"):
        calibration_windows(CALIBRATION_DOCS, word_tokenizer, n_samples=4, seq_len=61)


# --------------------------------------------------------------------------- batches


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=1, max_value=60), st.integers(min_value=1, max_value=60))
def test_batched_drops_the_last_partial_batch(n_windows: int, batch_size: int) -> None:
    windows = torch.arange(n_windows * 3).view(n_windows, 3)
    if n_windows < batch_size:
        with pytest.raises(DataError, match="data.batch_size"):
            batched(windows, batch_size)
        return
    batches = batched(windows, batch_size)
    assert len(batches) == n_windows // batch_size
    assert all(batch.shape == (batch_size, 3) for batch in batches)
    assert torch.equal(torch.cat(batches), windows[: len(batches) * batch_size])


def test_batched_keeps_the_partial_batch_when_asked() -> None:
    windows = torch.arange(23 * 2).view(23, 2)
    batches = batched(windows, 5, drop_last=False)
    assert [batch.shape[0] for batch in batches] == [5, 5, 5, 5, 3]
    assert torch.equal(torch.cat(batches), windows)


def test_batched_without_a_full_batch_names_the_fields() -> None:
    with pytest.raises(DataError, match=r"data.batch_size.*data.seq_len"):
        batched(torch.zeros(3, 4, dtype=torch.long), 4)
