"""The ``data`` and ``calibration`` sections: the text a run reads and how it is cut into windows."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ppframework.config.base import StrictModel


class DataConfig(StrictModel):
    """The evaluation text and how it is cut into batches of windows."""

    name: str = Field("wikitext2", description="wikitext2, c4, or a local .txt/.raw/.jsonl/.json/.parquet")
    split: str = "test"
    data_dir: str | None = Field(None, description="local data folder; else $PPF_DATA_DIR, ../shared/data")
    seq_len: int = Field(1024, ge=2)
    batch_size: int = Field(20, ge=1)
    window_policy: Literal["contiguous", "random"] = "random"
    max_batches: int | None = Field(None, ge=1, description="batches to run, warm-up included")
    warmup_batches: int = Field(1, ge=0)
    window_bos: bool = Field(
        False,
        description="start every evaluation and calibration window with the tokenizer's BOS token followed "
        "by seq_len - 1 text tokens (for models that always saw BOS in training, e.g. Gemma)",
    )
    warmup_policy: Literal["skip", "untracked"] = Field(
        "skip",
        description="skip: the first warmup_batches update the history and are not scored; untracked (the "
        "paper's code): they run once first without touching the history, then every batch is scored",
    )


class CalibrationConfig(StrictModel):
    """Dense calibration that initialises the history (paper: 2,000 C4 windows)."""

    dataset: str = "c4"
    split: str = "validation"
    n_samples: int = Field(2000, ge=1)
    seq_len: int | None = Field(None, ge=2, description="defaults to data.seq_len")
    batch_size: int = Field(8, ge=1)
    seed: int = 0
    cache: bool = True
    cache_dir: str | None = None
