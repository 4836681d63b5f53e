"""Text data sets to token windows: local data folder or Hugging Face hub, tokenisation, windows, batches.

Perplexity text follows docs/evaluation.md: the split's rows (or a local file's non-empty lines) joined
with ``"\\n\\n"``, tokenised once, cut into windows of ``seq_len`` tokens (``contiguous`` or ``random``)
and grouped into fixed-size batches. Calibration windows follow the Probe Pruning convention: random
windows from documents drawn uniformly, with replacement, among those longer than ``seq_len`` tokens.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ppframework.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "KNOWN_DATASETS",
    "TEXT_FILE_EXTENSIONS",
    "WINDOW_POLICIES",
    "DataError",
    "batched",
    "calibration_windows",
    "dataset_source",
    "load_corpus_text",
    "load_documents",
    "make_windows",
    "resolve_data_dir",
    "tokenize_text",
]

KNOWN_DATASETS: tuple[str, ...] = ("wikitext2", "c4")
"""Data set names understood besides local file paths."""

TEXT_FILE_EXTENSIONS: tuple[str, ...] = (".txt", ".raw", ".jsonl", ".json", ".parquet")
"""Extensions accepted for a local file given as the data set name."""

WINDOW_POLICIES: tuple[str, ...] = ("contiguous", "random")
"""How :func:`make_windows` cuts a token stream into windows."""

DATA_DIR_ENV = "PPF_DATA_DIR"

_WIKITEXT_SPLITS = ("train", "validation", "test")
_WIKITEXT_LOCAL = "wikitext-2-raw-v1/wiki.{split}.raw"
_C4_SPLIT = "validation"
_C4_LOCAL = "c4/c4-validation-2k.parquet"
_C4_HUB_FILE = "en/c4-validation.00000-of-00008.json.gz"
_REPO_ROOT = Path(__file__).resolve().parent.parent


class DataError(ConfigError):
    """A bad data input (name, path, split, sizes); the message names the config field and the fix.

    A subclass of :class:`ppframework.errors.ConfigError`, hence of :class:`ValueError`.
    """


# --------------------------------------------------------------------------- data folder


def _existing_folder(path: Path, problem: str) -> Path:
    """``path`` resolved; :class:`DataError` with message ``problem`` when it is not an existing folder."""
    if not path.is_dir():
        raise DataError(problem)
    return path.resolve()


def resolve_data_dir(explicit: str | Path | None) -> Path | None:
    """Find the local data folder.

    Order: ``explicit`` (the ``data.data_dir`` config field; must exist), then the environment variable
    ``PPF_DATA_DIR`` (must exist), then the first existing of ``<cwd>/../shared/data`` and
    ``<repo root>/../shared/data``; ``None`` when there is none (data then comes from the hub).

    Raises:
        DataError: ``explicit`` or ``PPF_DATA_DIR`` names a folder that does not exist.
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        return _existing_folder(
            path,
            f"data.data_dir: folder {str(path)!r} does not exist; give an existing data folder "
            f"or leave data.data_dir unset to use {DATA_DIR_ENV} or the Hugging Face hub.",
        )
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return _existing_folder(
            Path(env).expanduser(),
            f"{DATA_DIR_ENV}={env!r} is not an existing folder; point {DATA_DIR_ENV} at the data "
            f"folder (the one holding wikitext-2-raw-v1/ and c4/) or unset it.",
        )
    for candidate in (Path.cwd() / ".." / "shared" / "data", _REPO_ROOT / ".." / "shared" / "data"):
        if candidate.is_dir():
            return candidate.resolve()
    return None


# --------------------------------------------------------------------------- loading text


def load_corpus_text(name: str, split: str = "test", data_dir: str | Path | None = None) -> str:
    """Return the perplexity text of a data set: its non-empty rows (or lines) joined with ``"\\n\\n"``.

    Args:
        name: ``"wikitext2"``, ``"c4"`` or the path of a local ``.txt``/``.raw``/``.jsonl``/``.json``/
            ``.parquet`` file (the last three need a ``text`` column).
        split: the split to read (``wikitext2``: train/validation/test; ``c4``: validation only);
            ignored for local files.
        data_dir: the local data folder (``data.data_dir``); see :func:`resolve_data_dir`.

    Raises:
        DataError: unknown name, bad split, missing ``text`` column, or data neither local nor on the hub.
    """
    return "\n\n".join(load_documents(name, split, data_dir))


def load_documents(name: str, split: str = "test", data_dir: str | Path | None = None) -> list[str]:
    """Return the documents of a data set (non-empty rows, or non-empty lines of a text file).

    Same sources and arguments as :func:`load_corpus_text`; used for calibration sampling. Lines keep
    their leading spaces; only a trailing newline / ``"\\r"`` is removed. Whitespace-only rows are dropped.
    """
    if name == "wikitext2":
        return _wikitext2_documents(split, data_dir)
    if name == "c4":
        return _c4_documents(split, data_dir)
    path = Path(name).expanduser()
    if path.is_file():
        return _file_documents(path)
    raise DataError(
        f"data.name: {name!r} is neither a known data set nor an existing file; choose one of "
        f"{', '.join(KNOWN_DATASETS)} or give the path of a local file ending in "
        f"{', '.join(TEXT_FILE_EXTENSIONS)} (.jsonl/.json/.parquet need a 'text' column)."
    )


def _wikitext2_documents(split: str, data_dir: str | Path | None) -> list[str]:
    if split not in _WIKITEXT_SPLITS:
        raise DataError(
            f"data.split: {split!r} is not a wikitext2 split; choose one of {', '.join(_WIKITEXT_SPLITS)}."
        )
    path, expected = _local_file(data_dir, _WIKITEXT_LOCAL.format(split=split))
    if path is not None and path.is_file():
        logger.info("Loading wikitext2 %s from %s", split, path)
        return _text_file_lines(path)
    rows = _hub_text_rows(f"wikitext2 ({split})", expected, "wikitext", "wikitext-2-raw-v1", split=split)
    return _non_empty(row.rstrip("\r\n") for row in rows)


def _c4_documents(split: str, data_dir: str | Path | None) -> list[str]:
    if split != _C4_SPLIT:
        raise DataError(
            f"data.split: c4 has only the {_C4_SPLIT!r} split here (got {split!r}); set data.split to "
            f"{_C4_SPLIT!r}."
        )
    path, expected = _local_file(data_dir, _C4_LOCAL)
    if path is not None and path.is_file():
        logger.info("Loading c4 %s from %s", split, path)
        return _table_file_documents(path)
    hub_files = {_C4_SPLIT: _C4_HUB_FILE}
    rows = _hub_text_rows(f"c4 ({split})", expected, "allenai/c4", data_files=hub_files, split=_C4_SPLIT)
    return _non_empty(rows)


def _local_file(data_dir: str | Path | None, relative: str) -> tuple[Path | None, str]:
    """Where a data set's local copy would be (``None``: no data folder), and how to name it in messages."""
    root = resolve_data_dir(data_dir)
    if root is None:
        return None, f"<data folder>/{relative} (no data folder found)"
    return root / relative, str(root / relative)


def _hub_text_rows(what: str, expected: str, *args: Any, **kwargs: Any) -> list[str]:
    """Load a hub data set through ``datasets.load_dataset(*args, **kwargs)`` and return its ``text``.

    ``what`` names the data set and ``expected`` its missing local copy, for messages.
    """
    logger.info("Local copy of %s not found at %s; trying the Hugging Face hub", what, expected)
    try:
        import datasets

        rows = datasets.load_dataset(*args, **kwargs)["text"]
        return [row for row in rows if row is not None]
    except Exception as exc:  # offline, missing cache, network errors: all mean "not available"
        raise DataError(
            f"data.name: {what} is not in the local data folder (expected {expected}) and the "
            f"Hugging Face hub was unreachable ({type(exc).__name__}: {exc}); set {DATA_DIR_ENV} or "
            f"data.data_dir to a folder holding the file, or go online."
        ) from exc


def _file_documents(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix in (".txt", ".raw"):
        logger.info("Loading text file %s", path)
        return _text_file_lines(path)
    if suffix in (".jsonl", ".json", ".parquet"):
        logger.info("Loading table file %s", path)
        return _table_file_documents(path)
    raise DataError(
        f"data.name: file {str(path)!r} has an unsupported extension {suffix!r}; use one of "
        f"{', '.join(TEXT_FILE_EXTENSIONS)}, or one of the known data sets {', '.join(KNOWN_DATASETS)}."
    )


def _read_utf8(path: Path) -> str:
    """The text of ``path`` (UTF-8, a BOM allowed); :class:`DataError` naming the file otherwise."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            return handle.read()
    except UnicodeDecodeError as exc:
        raise DataError(
            f"data.name: file {str(path)!r} is not UTF-8 text (byte {exc.start}: {exc.reason}); convert it "
            "to UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or give another file."
        ) from None
    except OSError as exc:
        raise DataError(f"data.name: file {str(path)!r} cannot be read ({exc.strerror or exc}).") from None


def _text_file_lines(path: Path) -> list[str]:
    text = _read_utf8(path)
    return _non_empty(line.rstrip("\r") for line in text.split("\n"))


def _table_file_documents(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # ArrowInvalid, OSError: not a (complete) parquet file
            raise DataError(
                f"data.name: file {str(path)!r} is not a readable parquet file ({type(exc).__name__}: {exc})."
            ) from None
        columns = list(table.column_names)
        values = table.column("text").to_pylist() if "text" in columns else None
    else:
        records = _json_records(path)
        columns = sorted({key for record in records for key in record})
        values = [record.get("text") for record in records] if "text" in columns else None
    if values is None:
        raise DataError(
            f"data.name: file {str(path)!r} has no 'text' column (columns found: "
            f"{', '.join(columns) if columns else 'none'}); rename the text column to 'text'."
        )
    for index, value in enumerate(values):
        if value is not None and not isinstance(value, str):
            raise DataError(
                f"data.name: file {str(path)!r} row {index} has a non-string 'text' "
                f"({type(value).__name__}); every 'text' value must be a string."
            )
    return _non_empty(value for value in values if value is not None)


def _json_records(path: Path) -> list[dict[str, Any]]:
    """Read a ``.jsonl`` file, or a ``.json`` file holding an array of objects (or JSON lines)."""
    text = _read_utf8(path)
    if path.suffix.lower() == ".json":
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError:
            loaded = None  # not a single JSON document: read it as JSON lines below
        if isinstance(loaded, list):
            return _check_records(path, loaded)
        if loaded is not None:
            raise DataError(
                f"data.name: file {str(path)!r} must hold an array of objects or one JSON object per line."
            )
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(
                f"data.name: file {str(path)!r} line {number} is not valid JSON ({exc})."
            ) from exc
    return _check_records(path, records)


def _check_records(path: Path, records: list[Any]) -> list[dict[str, Any]]:
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(
                f"data.name: file {str(path)!r} record {index} is a {type(record).__name__}, not an object "
                f"with a 'text' field."
            )
    return records


def _non_empty(rows: Iterable[str]) -> list[str]:
    return [row for row in rows if row.strip()]


def dataset_source(name: str, split: str = "test", data_dir: str | Path | None = None) -> str:
    """What a data set's content depends on, for cache keys: the resolved local file with its size and
    modification time, or ``hub:<name>/<split>`` when there is no local copy. Reads no data."""
    if name == "wikitext2":
        path, _ = _local_file(data_dir, _WIKITEXT_LOCAL.format(split=split))
    elif name == "c4":
        path, _ = _local_file(data_dir, _C4_LOCAL)
    else:
        path = Path(name).expanduser()
    if path is not None and path.is_file():
        stat = path.stat()
        return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return f"hub:{name}/{split}"


# --------------------------------------------------------------------------- tokens and windows


def tokenize_text(text: str, tokenizer: Any) -> torch.Tensor:
    """Tokenise ``text`` once with the tokenizer's default special tokens; return a 1-D LongTensor.

    A tokenizer that adds a BOS token adds exactly one, at the start. Texts longer than the tokenizer's
    ``model_max_length`` are fine (the length warning is silenced; windows are cut afterwards).
    """
    return _encode(tokenizer, text)


def _encode(tokenizer: Any, text: str, **kwargs: Any) -> torch.Tensor:
    from transformers import PreTrainedTokenizerBase

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        kwargs["verbose"] = False  # the "longer than the maximum sequence length" warning
    ids = tokenizer(text, return_tensors="pt", **kwargs).input_ids[0]
    return ids.to(torch.long)


def make_windows(
    ids: torch.Tensor,
    seq_len: int,
    policy: str = "contiguous",
    seed: int = 0,
    max_windows: int | None = None,
) -> torch.Tensor:
    """Cut a 1-D token stream into windows of ``seq_len`` tokens; return a LongTensor ``(N, seq_len)``.

    Args:
        ids: the token ids, 1-D.
        seq_len: tokens per window (``data.seq_len``).
        policy: ``"contiguous"``: non-overlapping windows from the start, the tail dropped;
            ``"random"``: ``len(ids) // seq_len`` windows at offsets drawn uniformly from
            ``[0, len(ids) - seq_len]`` by a ``torch.Generator`` seeded with ``seed``.
        seed: the seed of the ``random`` policy.
        max_windows: keep only the first ``max_windows`` windows; ``None``: all.

    Raises:
        DataError: unknown policy, non-positive sizes, or fewer than ``seq_len`` tokens.
    """
    if policy not in WINDOW_POLICIES:
        raise DataError(
            f"data.window_policy: unknown policy {policy!r}; choose one of {', '.join(WINDOW_POLICIES)}."
        )
    if ids.dim() != 1:
        raise DataError(f"make_windows needs a 1-D tensor of token ids, got shape {tuple(ids.shape)}.")
    if seq_len < 1:
        raise DataError(f"data.seq_len: must be a positive number of tokens, got {seq_len}.")
    if max_windows is not None and max_windows < 1:
        raise DataError(f"max_windows: must be positive or None (all windows), got {max_windows}.")
    n_tokens = ids.numel()
    n_windows = n_tokens // seq_len
    if n_windows == 0:
        raise DataError(
            f"data.seq_len: the text has only {n_tokens} tokens, fewer than data.seq_len={seq_len}; "
            f"lower data.seq_len or use a longer text."
        )
    ids = ids.to(torch.long)
    if policy == "contiguous":
        windows = ids[: n_windows * seq_len].reshape(n_windows, seq_len)
    else:
        generator = torch.Generator().manual_seed(seed)
        offsets = torch.randint(0, n_tokens - seq_len + 1, (n_windows,), generator=generator)
        windows = ids[offsets.unsqueeze(1) + torch.arange(seq_len)]
    if max_windows is not None:
        windows = windows[:max_windows]
    logger.debug("%d %s windows of %d tokens from %d tokens", windows.shape[0], policy, seq_len, n_tokens)
    return windows


def start_with_bos(
    windows: torch.Tensor, tokenizer: Any, field_name: str = "data.window_bos"
) -> torch.Tensor:
    """Each window as BOS followed by its first ``seq_len - 1`` tokens (same shape, ``(N, seq_len)``).

    Gemma-style models saw BOS at the start of every training sequence; without it their perplexity on
    windows cut from the middle of a text is several times higher (docs/families.md).

    Raises:
        DataError: the tokenizer has no BOS token.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise DataError(f"{field_name}: the tokenizer has no BOS token; set it to false")
    column = torch.full((windows.shape[0], 1), int(bos), dtype=windows.dtype)
    return torch.cat([column, windows[:, :-1]], dim=1)


def calibration_windows(
    documents: Sequence[str],
    tokenizer: Any,
    n_samples: int,
    seq_len: int,
    seed: int = 0,
) -> torch.Tensor:
    """Draw calibration windows the Probe Pruning way; return a LongTensor ``(n_samples, seq_len)``.

    Each sample draws a document uniformly at random, with replacement, among the documents with more
    than ``seq_len`` tokens (rejection sampling over all documents), then a window of ``seq_len`` tokens
    at a uniform random offset in it. Documents are tokenised (with special tokens) only when first drawn,
    and cached; everything comes from one ``torch.Generator`` seeded with ``seed``.

    Raises:
        DataError: no documents, non-positive sizes, or no document longer than ``seq_len`` tokens.
    """
    if not documents:
        raise DataError("calibration.dataset: the calibration data set has no documents; choose another one.")
    if n_samples < 1:
        raise DataError(f"calibration.n_samples: must be positive, got {n_samples}.")
    if seq_len < 1:
        raise DataError(f"calibration.seq_len: must be a positive number of tokens, got {seq_len}.")
    generator = torch.Generator().manual_seed(seed)
    lengths: dict[int, int] = {}
    long_docs: dict[int, torch.Tensor] = {}
    samples: list[torch.Tensor] = []
    chosen: set[int] = set()
    while len(samples) < n_samples:
        if len(lengths) == len(documents):
            # Every document is known: draw among the long ones directly (same distribution, no rejections).
            if not long_docs:
                raise DataError(
                    f"calibration.seq_len: no document has more than {seq_len} tokens (the longest of "
                    f"{len(documents)} has {max(lengths.values())}); lower calibration.seq_len or use a "
                    f"data set with longer documents."
                )
            keys = sorted(long_docs)
            index = keys[int(torch.randint(len(keys), (1,), generator=generator))]
        else:
            index = int(torch.randint(len(documents), (1,), generator=generator))
            if index not in lengths:
                ids = _encode(tokenizer, documents[index], add_special_tokens=True)
                lengths[index] = ids.numel()
                if ids.numel() > seq_len:
                    long_docs[index] = ids
        ids = long_docs.get(index)
        if ids is None:
            continue
        start = int(torch.randint(ids.numel() - seq_len + 1, (1,), generator=generator))
        samples.append(ids[start : start + seq_len])
        chosen.add(index)
    logger.info(
        "%d calibration windows of %d tokens from %d distinct documents (%d tokenised)",
        n_samples,
        seq_len,
        len(chosen),
        len(lengths),
    )
    return torch.stack(samples)


def batched(windows: torch.Tensor, batch_size: int, drop_last: bool = True) -> list[torch.Tensor]:
    """Split windows ``(N, seq_len)`` into batches of ``batch_size`` (views, in order).

    With ``drop_last`` (the default) the last partial batch is dropped, so every batch has the same size
    (dynamic pruning depends on the batch).

    Raises:
        DataError: non-positive ``batch_size``, or no full batch (fewer windows than ``batch_size``).
    """
    if batch_size < 1:
        raise DataError(f"data.batch_size: must be positive, got {batch_size}.")
    n_windows = windows.shape[0]
    stop = n_windows - n_windows % batch_size if drop_last else n_windows
    if stop == 0:
        raise DataError(
            f"data.batch_size: {n_windows} windows do not fill one batch of {batch_size}; lower "
            f"data.batch_size or data.seq_len, or use a longer text (data.name)."
        )
    if stop < n_windows:
        logger.info("Dropping the last %d windows (partial batch of %d)", n_windows - stop, batch_size)
    return [windows[start : start + batch_size] for start in range(0, stop, batch_size)]
