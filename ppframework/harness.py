"""lm-evaluation-harness on a model with a pipeline attached (``ppf eval``, ``evaluation.lm_eval``).

The live model (pipeline attached or not) is wrapped in the harness's Hugging Face class
(:class:`PrunedHFLM`, a thin :class:`lm_eval.models.huggingface.HFLM` subclass) and evaluated through
``lm_eval.simple_evaluate``. The harness is an optional extra (``pip install 'ppframework[lm-eval]'``),
pinned to :data:`LM_EVAL_VERSION`.

Offline tasks: the seven paper tasks are shipped as harness task YAMLs in
``ppframework/lm_eval_tasks/`` that include the stock YAMLs and read the local data folder
(:func:`ppframework.data.resolve_data_dir`) instead of the hub. :func:`write_offline_tasks` fills in the
paths and writes them to a temporary folder, which the harness's ``TaskManager`` indexes as an include
path. Any other task name (or one of the seven without local files, or ``local_data: false``) is the
stock harness task.

Generation tasks: ``humaneval``, ``mbpp`` and ``xsum`` (:data:`OFFLINE_GENERATION_TASKS`) are shipped
too, as ``generate_until`` tasks of their own (not the stock YAMLs) that read ``<data folder>/generation``
and reuse :mod:`ppframework.generation.tasks` for prompts, post-processing and scoring (pass@1 in
ppframework's sandbox, ROUGE). Running generated code needs an opt-in,
``evaluation.lm_eval.allow_code_execution`` (checked by :func:`plan_lm_eval`); the YAMLs are also marked
``unsafe_code`` so the harness itself refuses them without ``confirm_run_unsafe_code``. During
:func:`run_lm_eval`, :func:`generation_settings` gives their functions the tokenizer (XSum's chat form and
document cut), the prompt-length limit and the sandbox's time limit; :class:`PrunedHFLM` lets a
generation prompt use the positions the built-in tasks allow instead of the harness's
``max_length - max_gen_toks`` (see docs/evaluation.md for what still differs).

Batch composition (it decides what a dynamic method prunes): the harness pools the requests of every
task of the run, sorts them by descending token length (then by the tokens), groups requests whose
one-token continuations share a context (``logits_cache``: one row scores them all) and cuts the sorted
list into batches of ``batch_size`` rows, right-padded. It is deterministic for a given task list,
limit, few-shot setting, tokenizer and batch size; :class:`PrunedHFLM` records the rows and width of
every forward. Unlike the stock HFLM it passes the attention mask of the right padding, so padding
never reaches probe selection or history (the dense logits of real tokens are unchanged).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ppframework.config import ZEROSHOT_TASKS, LmEvalConfig, RunConfig
from ppframework.data import resolve_data_dir
from ppframework.devices import input_device
from ppframework.errors import ConfigError

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

logger = logging.getLogger(__name__)

__all__ = [
    "LM_EVAL_VERSION",
    "OFFLINE_GENERATION_TASKS",
    "OFFLINE_TASKS",
    "TEMPLATE_DIR",
    "GenerationSettings",
    "LmEvalPlan",
    "generation_settings",
    "LmEvalRun",
    "make_hflm",
    "plan_lm_eval",
    "require_lm_eval",
    "run_lm_eval",
    "write_offline_tasks",
]

LM_EVAL_VERSION = "0.4.13"
"""The lm-evaluation-harness version the offline task configs and :class:`PrunedHFLM` were tested with."""

OFFLINE_TASKS: tuple[str, ...] = ZEROSHOT_TASKS
"""Tasks with an offline config in ``ppframework/lm_eval_tasks`` (same names as the stock tasks)."""

OFFLINE_GENERATION_TASKS: tuple[str, ...] = ("humaneval", "mbpp", "xsum")
"""Generation tasks with an offline config (``generate_until``, built on :mod:`ppframework.generation`)."""

CODE_TASKS: tuple[str, ...] = ("humaneval", "mbpp")
"""Offline tasks whose scoring runs generated code (opt-in: ``evaluation.lm_eval.allow_code_execution``)."""

_ALL_OFFLINE: tuple[str, ...] = OFFLINE_TASKS + OFFLINE_GENERATION_TASKS

TEMPLATE_DIR = Path(__file__).parent / "lm_eval_tasks"
"""The shipped task YAML templates and their ``utils.py``."""

_ZEROSHOT = "@ZEROSHOT@"
_GENERATION = "@GENERATION@"
_LM_EVAL_TASKS = "@LM_EVAL_TASKS@"
_DATA_FOLDERS = {_ZEROSHOT: "zeroshot", _GENERATION: "generation"}
"""Placeholder -> its sub-folder of the data folder."""
_PLACEHOLDER_PATH = re.compile(r'"(@ZEROSHOT@|@GENERATION@)/([^"]+)"')


def require_lm_eval(field_name: str = "evaluation.lm_eval.enabled") -> str:
    """Return the installed lm-evaluation-harness version (a warning if it is not the pinned one).

    Raises:
        ConfigError: the harness is not installed (the message names ``field_name`` and the extra).
    """
    try:
        version = importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"{field_name}: lm-evaluation-harness is not installed; pip install 'ppframework[lm-eval]' "
            f"(lm_eval=={LM_EVAL_VERSION})"
        ) from None
    if version != LM_EVAL_VERSION:
        logger.warning(
            "lm-evaluation-harness %s is installed; ppframework's task configs were tested with %s",
            version,
            LM_EVAL_VERSION,
        )
    return version


def _harness_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _yaml_string(text: str) -> str:
    """``text`` as the inside of a YAML double-quoted scalar (JSON escaping is valid YAML)."""
    return json.dumps(text)[1:-1]


def _offline_task_paths(task: str, root: Path) -> list[Path]:
    """The files under the data folder ``root`` that the offline config of ``task`` reads."""
    template = (TEMPLATE_DIR / f"{task}.yaml").read_text(encoding="utf-8")
    return [root / _DATA_FOLDERS[mark] / rel for mark, rel in _PLACEHOLDER_PATH.findall(template)]


def offline_task_files(task: str, data_dir: str | Path | None) -> list[Path] | None:
    """The local files the offline config of ``task`` reads, or None when a file is missing."""
    root = resolve_data_dir(data_dir)
    if root is None or task not in _ALL_OFFLINE:
        return None
    files = _offline_task_paths(task, root)
    return files if files and all(f.is_file() for f in files) else None


def _check_generation_files(cfg: RunConfig) -> None:
    """A generation task (:data:`OFFLINE_GENERATION_TASKS`) with ``local_data`` needs its local file.

    The stock harness task of the same name is a different task (another prompt, hub data, and for
    XSum the ``unitxt`` package), so a missing file is an error naming it, not a silent switch.
    """
    le = cfg.evaluation.lm_eval
    if not le.local_data:
        return
    root = resolve_data_dir(cfg.data.data_dir)
    for i, name in enumerate(le.tasks):
        if name not in OFFLINE_GENERATION_TASKS or offline_task_files(name, cfg.data.data_dir) is not None:
            continue
        if root is None:
            where = "no data folder is set (data.data_dir or PPF_DATA_DIR)"
        else:
            missing = [str(f) for f in _offline_task_paths(name, root) if not f.is_file()]
            where = f"{', '.join(missing)} does not exist"
        raise ConfigError(
            f"evaluation.lm_eval.tasks[{i}]: {name!r} reads <data_dir>/generation/ and {where}; put the "
            "file there or point data.data_dir / PPF_DATA_DIR at a folder holding it (set "
            "evaluation.lm_eval.local_data: false for the harness's own task of that name)"
        )


def write_offline_tasks(
    target: str | Path, data_dir: str | Path | None, tasks: Sequence[str]
) -> dict[str, list[str]]:
    """Write the offline configs of ``tasks`` (those of :data:`OFFLINE_TASKS` and
    :data:`OFFLINE_GENERATION_TASKS` whose local files exist) into ``target``, with the data folder's
    sub-folders and the harness's tasks folder filled in, plus ``utils.py``.

    Returns:
        task -> the local files it reads, for every task written.
    """
    out = Path(target)
    out.mkdir(parents=True, exist_ok=True)
    root = resolve_data_dir(data_dir)
    stock = _harness_tasks_dir()
    written: dict[str, list[str]] = {}
    for task in tasks:
        files = offline_task_files(task, data_dir)
        if files is None or root is None:
            continue
        text = (TEMPLATE_DIR / f"{task}.yaml").read_text(encoding="utf-8")
        for mark, folder in _DATA_FOLDERS.items():
            text = text.replace(mark, _yaml_string(str(root / folder)))
        text = text.replace(_LM_EVAL_TASKS, _yaml_string(str(stock)))
        (out / f"{task}.yaml").write_text(text, encoding="utf-8")
        written[task] = [str(f) for f in files]
    if written:
        shutil.copyfile(TEMPLATE_DIR / "utils.py", out / "utils.py")
    return written


@dataclass
class LmEvalPlan:
    """Which tasks run from local files and which are stock, and the task index that finds them.

    Made before the model loads (:func:`plan_lm_eval`); :meth:`close` removes the temporary folder.
    """

    tasks: list[str]
    local: dict[str, list[str]]
    include_dir: Path
    include_path: str | None
    version: str
    allow_code_execution: bool = False
    """Whether generated code may run (``evaluation.lm_eval.allow_code_execution``; the harness's
    ``confirm_run_unsafe_code``)."""
    code_timeout_s: float = 10.0
    """Time limit of each generated program (``evaluation.generation.timeout_s``)."""
    _manager: TaskManager | None = None
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def stock(self) -> list[str]:
        """Task names the harness resolves itself (hub data)."""
        return [t for t in self.tasks if t not in self.local]

    def manager(self) -> TaskManager:
        """The harness ``TaskManager`` (built once): the offline folder, ``include_path`` and, only
        when a stock task is needed, the harness's own tasks (indexing them takes seconds)."""
        if self._manager is None:
            from lm_eval.tasks import TaskManager

            paths = [str(self.include_dir)] + ([self.include_path] if self.include_path else [])
            self._manager = TaskManager(include_path=paths, include_defaults=bool(self.stock))
        return self._manager

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary for the report's settings."""
        return {"version": self.version, "local_tasks": self.local, "stock_tasks": self.stock}

    def close(self) -> None:
        """Remove the temporary task folder."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def plan_lm_eval(cfg: RunConfig) -> LmEvalPlan:
    """Check ``evaluation.lm_eval`` before any model loads and prepare its tasks.

    Raises:
        ConfigError: the harness is missing, ``include_path`` is not a folder, a task name is neither
            an offline task nor a task, group or tag the harness knows, or a code task (HumanEval, MBPP)
            is listed without the opt-in ``evaluation.lm_eval.allow_code_execution`` (the message names
            ``evaluation.lm_eval.tasks[i]``).
    """
    le = cfg.evaluation.lm_eval
    gen = cfg.evaluation.generation
    for i, name in enumerate(le.tasks):
        if name in CODE_TASKS and not le.allow_code_execution:
            raise ConfigError(
                f"evaluation.lm_eval.tasks[{i}]: {name!r} scores by running the generated code (pass@1 in "
                "ppframework's sandbox); set evaluation.lm_eval.allow_code_execution: true to allow it, or "
                "drop the task"
            )
    _check_generation_files(cfg)
    version = require_lm_eval()
    if le.include_path is not None and not Path(le.include_path).expanduser().is_dir():
        raise ConfigError(f"evaluation.lm_eval.include_path: {le.include_path!r} is not a folder")
    tmp = tempfile.TemporaryDirectory(prefix="ppf-lm-eval-tasks-")
    local = write_offline_tasks(tmp.name, cfg.data.data_dir, le.tasks) if le.local_data else {}
    plan = LmEvalPlan(
        list(le.tasks),
        local,
        Path(tmp.name),
        str(Path(le.include_path).expanduser()) if le.include_path else None,
        version,
        allow_code_execution=le.allow_code_execution,
        code_timeout_s=gen.timeout_s,
        _tmp=tmp,
    )
    try:
        if plan.stock or plan.include_path:
            known = set(plan.manager().all_tasks)
            for i, name in enumerate(le.tasks):
                if name not in known:
                    raise ConfigError(
                        f"evaluation.lm_eval.tasks[{i}]: {name!r} is not a task, group or tag of "
                        f"lm-evaluation-harness {version}"
                        + (f" or of {plan.include_path}" if plan.include_path else "")
                        + f"; offline tasks: {', '.join(_ALL_OFFLINE)}"
                    )
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
        for name in plan.stock:
            logger.log(
                logging.WARNING if offline else logging.INFO,
                "lm-eval task %s: stock harness task (hub data%s)",
                name,
                "; HF_HUB_OFFLINE is set, so only the datasets cache can serve it" if offline else "",
            )
    except BaseException:
        plan.close()
        raise
    return plan


# --------------------------------------------------------------------------- generation tasks


@dataclass(frozen=True)
class GenerationSettings:
    """What the offline generation tasks' functions (``lm_eval_tasks/utils.py``) need from the run.

    Active only inside :func:`run_lm_eval` (:func:`generation_settings`); the harness gives its task
    functions nothing but the document.
    """

    tokenizer: Any
    """The run's tokenizer: XSum's chat form and its document cut (as the built-in task)."""
    prompt_limit: Callable[[int], int | None]
    """Longest prompt, in tokens, for a task generating that many new tokens (None: no limit)."""
    timeout_s: float
    """Time limit of each generated program in the sandbox."""
    allow_code_execution: bool
    """The opt-in (``evaluation.lm_eval.allow_code_execution``); the code tasks' scorers refuse without it."""


_ACTIVE_GENERATION: GenerationSettings | None = None


def generation_settings() -> GenerationSettings | None:
    """The settings of the :func:`run_lm_eval` call in progress (None outside one)."""
    return _ACTIVE_GENERATION


@contextmanager
def _generation_context(settings: GenerationSettings) -> Iterator[None]:
    global _ACTIVE_GENERATION
    previous, _ACTIVE_GENERATION = _ACTIVE_GENERATION, settings
    try:
        yield
    finally:
        _ACTIVE_GENERATION = previous


# --------------------------------------------------------------------------- the model wrapper


_GENERATION_ROOM = 1 << 30
"""Added to :class:`PrunedHFLM`'s ``max_length`` while it generates (see its ``max_length``)."""


@functools.cache
def _hflm_class() -> type:
    from lm_eval.models.huggingface import HFLM

    class PrunedHFLM(HFLM):
        """HFLM that passes the right-padding attention mask and records every forward's batch.

        The stock ``_loglikelihood_tokens`` pads rows with token 0 and calls the model without a mask;
        here the real length of each row is captured where the harness pads them
        (``lm_eval.models.huggingface.pad_and_concat``) and turned into ``attention_mask``.

        Generation (``generate_until``): the stock class cuts every prompt from the left to
        ``max_length - max_gen_toks`` tokens; here a prompt may have :meth:`prompt_limit` tokens, as in
        ppframework's built-in generation tasks, and a longer one is an error (never silently cut).
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.batch_log: list[dict[str, Any]] = []
            self._row_lengths: list[int] | None = None
            self._generating = False

        @property
        def max_length(self) -> int:
            # while generating, far above any prompt: the stock max_length - max_gen_toks cut (and its
            # assertion that it is positive) never applies; tok_batch_encode checks prompt_limit instead
            length = int(super().max_length)
            return length + _GENERATION_ROOM if getattr(self, "_generating", False) else length

        def prompt_limit(self, new_tokens: int) -> int | None:
            """Longest generation prompt: ``max_length`` (the history's positions when a method has a
            calibrated history) and the model's positions minus ``new_tokens``."""
            length = int(super().max_length)
            limits = [length] if length else []
            positions = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
            if positions:
                limits.append(int(positions) - int(new_tokens))
            return min(limits) if limits else None

        def generate_until(self, requests: Any, disable_tqdm: bool = False) -> Any:
            self._generating = True
            try:
                return super().generate_until(requests, disable_tqdm=disable_tqdm)
            finally:
                self._generating = False

        def tok_batch_encode(
            self,
            strings: list[str],
            padding_side: str = "left",
            left_truncate_len: int | None = None,
            truncation: bool = False,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if not (self._generating and left_truncate_len):
                return super().tok_batch_encode(strings, padding_side, left_truncate_len, truncation)
            new_tokens = self.max_length - int(left_truncate_len)
            limit = self.prompt_limit(new_tokens)
            ids, mask = super().tok_batch_encode(strings, padding_side, None, truncation)
            if limit is not None and ids.shape[1] > limit:
                raise ConfigError(
                    f"lm-eval generation: a prompt of {ids.shape[1]} tokens is longer than {limit}, the most "
                    f"a prompt may have with {new_tokens} new tokens (max_length {super().max_length}: "
                    "evaluation.lm_eval.max_length, by default calibration.seq_len when a method has a "
                    "calibrated history; and the model's positions minus the new tokens). Raise "
                    "calibration.seq_len or drop the task"
                )
            return ids, mask

        def _loglikelihood_tokens(
            self, requests: Any, disable_tqdm: bool = False, override_bs: Any = None
        ) -> Any:
            with _capture_row_lengths(self):
                return super()._loglikelihood_tokens(
                    requests, disable_tqdm=disable_tqdm, override_bs=override_bs
                )

        def _model_call(self, inps: torch.Tensor, attn_mask: Any = None, labels: Any = None) -> torch.Tensor:
            lengths, self._row_lengths = self._row_lengths, None
            if attn_mask is not None or labels is not None:
                return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
            rows, width = int(inps.shape[0]), int(inps.shape[1])
            if lengths is None or len(lengths) != rows:
                # the padding was not seen (another harness version?): the stock, unmasked call
                if not any(not b["masked"] for b in self.batch_log):
                    logger.warning("lm-eval: row lengths unknown; the model runs without a padding mask")
                self.batch_log.append({"rows": rows, "width": width, "masked": False})
                return super()._model_call(inps)
            mask = (
                torch.arange(width, device=inps.device)[None, :]
                < torch.tensor(lengths, device=inps.device)[:, None]
            ).long()
            self.batch_log.append({"rows": rows, "width": width, "masked": True, "lengths": list(lengths)})
            with torch.no_grad():
                return self.model(input_ids=inps, attention_mask=mask, use_cache=False).logits

    return PrunedHFLM


@contextmanager
def _capture_row_lengths(lm: Any) -> Iterator[None]:
    """While the harness builds log-likelihood batches, record each right-padded row's real length."""
    import lm_eval.models.huggingface as hf

    original = hf.pad_and_concat

    def recording(max_length: int, tensors: list[torch.Tensor], padding_side: str = "right") -> torch.Tensor:
        if padding_side == "right":
            lm._row_lengths = [int(t.shape[-1]) for t in tensors]
        return original(max_length, tensors, padding_side=padding_side)

    hf.pad_and_concat = recording
    try:
        yield
    finally:
        hf.pad_and_concat = original


def make_hflm(model: torch.nn.Module, tokenizer: Any, batch_size: int, max_length: int | None) -> Any:
    """The harness's Hugging Face model class around the live ``model`` (a :class:`PrunedHFLM`).

    The tokenizer is copied (HFLM may set a pad token on it); ``batch_size`` is fixed (never "auto");
    ``max_length`` is the longest input the harness feeds (it left-truncates longer requests);
    log-probabilities are taken in float32. Inputs go to the model's input device
    (:func:`~ppframework.devices.input_device`), also for a device-mapped model.
    """
    cls = _hflm_class()
    lm = cls(
        pretrained=model,
        tokenizer=copy.deepcopy(tokenizer),
        batch_size=int(batch_size),
        max_length=max_length,
        logits_cache=True,
        softmax_dtype=torch.float32,  # as the built-in scorer: fp32 log-softmax whatever the model dtype
    )
    # HFLM sends inputs to ``model.device`` (the first parameter's: ``meta`` when a device map offloads
    # the embedding); the input embedding's execution device is where they belong.
    lm._device = input_device(model)
    return lm


# --------------------------------------------------------------------------- running


@dataclass
class LmEvalRun:
    """What one method scored through the harness, and the batches it ran."""

    tasks: dict[str, dict[str, Any]]
    batches: dict[str, Any]
    seconds: float
    mean_acc: float | None = None
    n_tasks_in_mean: int = 0
    settings: dict[str, Any] = field(default_factory=dict)


def _task_metrics(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"acc,none": ..}`` per task -> ``{"acc": .., "acc_stderr": .., "n_items": ..}``."""
    out: dict[str, dict[str, Any]] = {}
    samples = results.get("n-samples", {})
    for task, metrics in results.get("results", {}).items():
        row: dict[str, Any] = {}
        for key, value in metrics.items():
            name, comma, filt = key.partition(",")
            if not comma or isinstance(value, bool) or not isinstance(value, int | float):
                continue  # "alias", "sample_len", "N/A" stderr
            row[name if filt == "none" else key] = float(value)
        if task in samples:
            row["n_items"] = int(samples[task].get("effective", samples[task].get("original", 0)))
        out[task] = row
    return out


def _main_metric(metrics: dict[str, Any]) -> str:
    """``acc=..`` for a task that reports acc, else its first score (``pass@1=..``, ``rouge1=..``)."""
    names = [k for k in metrics if k != "n_items" and "_stderr" not in k and "," not in k]
    name = "acc" if "acc" in metrics else (names[0] if names else "acc")
    return f"{name}={metrics.get(name, float('nan')):.4f}"


def _batch_summary(log: list[dict[str, Any]]) -> dict[str, Any]:
    """Forwards, rows and widths in order, plus a digest of every row length (the composition)."""
    digest = hashlib.sha256(json.dumps([b.get("lengths", [b["rows"], b["width"]]) for b in log]).encode())
    return {
        "forwards": len(log),
        "rows": [b["rows"] for b in log],
        "widths": [b["width"] for b in log],
        "masked": all(b["masked"] for b in log),
        "digest": digest.hexdigest()[:16],
    }


def run_lm_eval(
    model: torch.nn.Module,
    tokenizer: Any,
    plan: LmEvalPlan,
    le: LmEvalConfig,
    *,
    max_length: int | None,
    label: str = "",
) -> LmEvalRun:
    """Evaluate ``plan``'s tasks on ``model`` as it is now (attach a pipeline around this call).

    ``simple_evaluate`` gets a :class:`PrunedHFLM`, the plan's ``TaskManager``, ``le.limit``,
    ``le.num_fewshot`` and ``le.seed`` for its random, numpy, torch and few-shot seeds; no request
    cache, no sample log; ``confirm_run_unsafe_code`` is the plan's code-execution opt-in, and the
    generation tasks see :func:`generation_settings` while it runs.
    """
    import time

    from lm_eval import simple_evaluate

    started = time.perf_counter()
    lm = make_hflm(model, tokenizer, le.batch_size, max_length)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    settings = GenerationSettings(tokenizer, lm.prompt_limit, plan.code_timeout_s, plan.allow_code_execution)
    try:
        with _generation_context(settings):
            results = simple_evaluate(
                model=lm,
                tasks=list(plan.tasks),
                num_fewshot=le.num_fewshot,
                limit=le.limit,
                task_manager=plan.manager(),
                log_samples=False,
                bootstrap_iters=1000,
                random_seed=le.seed,
                numpy_random_seed=le.seed,
                torch_random_seed=le.seed,
                fewshot_random_seed=le.seed,
                confirm_run_unsafe_code=plan.allow_code_execution,
            )
    except ValueError as exc:  # a stock task marked unsafe (it runs generated code), without the opt-in
        if "marked as unsafe" not in str(exc):
            raise
        raise ConfigError(
            f"evaluation.lm_eval.tasks: {exc} Running generated code needs the opt-in "
            "evaluation.lm_eval.allow_code_execution: true"
        ) from None
    if results is None:
        raise RuntimeError("lm_eval.simple_evaluate returned no results (non-zero rank?)")
    tasks = _task_metrics(results)
    accs = [m["acc"] for m in tasks.values() if "acc" in m]
    run = LmEvalRun(
        tasks=tasks,
        batches=_batch_summary(lm.batch_log),
        seconds=time.perf_counter() - started,
        mean_acc=sum(accs) / len(accs) if accs else None,
        n_tasks_in_mean=len(accs),
        settings={"max_length": lm.max_length, "batch_size": le.batch_size, "logits_cache": True},
    )
    logger.info(
        "lm-eval %s: %s (%d forwards, %.1f s)",
        label,
        ", ".join(f"{t} {_main_metric(m)}" for t, m in tasks.items()),
        run.batches["forwards"],
        run.seconds,
    )
    return run
