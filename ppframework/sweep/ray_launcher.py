"""``ppf ablate --launcher ray``: the points of a sweep as Ray actor tasks.

Ray does the scheduling; this module only hands it the points and gathers what comes back:

* **Workers** are Ray actors (:class:`PointWorker`), each asking for the file's ``resources``
  (CPUs, GPUs, memory). A worker loads the model and the evaluation batches once, in its own
  :class:`~ppframework.runner.session.RunSession`, and evaluates every point it is given with the same code as
  the local launcher, so the merged table equals a local run's apart from timings.
* **Calibration** is computed once, by one worker (which also reads or fills the on-disk cache), and
  shared through Ray's object store with every other worker.
* **The point store** (:mod:`ppframework.runner.points`) receives every finished point as it
  arrives, so a re-run of the same file skips finished points and resumes after a crash.
* **Failures**: a point that raises is a failed row (as locally). A worker that dies (killed, out of
  memory, segfault) fails the point it was running, with Ray's reason, and is replaced by a fresh
  worker for the remaining points.

Timings: workers run side by side on the same machines, so their time ratios are noisier than a
local run's; use the local launcher (or one worker) when timings matter.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import asdict
from typing import Any

from ppframework.ablation import WorkerResources
from ppframework.config import RunConfig
from ppframework.errors import ConfigError
from ppframework.outputs import hold_out_dir
from ppframework.preflight import preflight
from ppframework.runner import MethodResult, RunReport, RunSession, describe_error, try_write_report
from ppframework.runner.points import (
    PointKeys,
    PointStore,
    load_dense,
    load_method,
    save_dense,
    save_method,
    sweep_summary,
)

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'ppframework[ray]'"
"""How to get Ray (the optional extra)."""

#: Environment variables the workers need to see as the driver does (data, caches, plugins, offline).
RAY_ERROR_CHARS = 600
"""How much of a Ray error (which carries the remote traceback) a failed row keeps."""

FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "PPF_CACHE_DIR", "PPF_DATA_DIR", "PPF_LOAD_PLUGINS")

CONNECT_TIMEOUT_S = 10.0
"""How long ``--address HOST:PORT`` may take to accept a connection before the sweep is refused (Ray's
own connect retries for minutes without a word)."""


def import_ray() -> Any:
    """The ``ray`` module, or a :class:`ConfigError` that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--launcher ray: Ray is not installed; install it with `{INSTALL_HINT}`") from None
    return ray


class PointWorker:
    """One worker's state: a :class:`RunSession` of the run config, loaded on first use."""

    def __init__(self, cfg: RunConfig, threads: int | None = None) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.session = RunSession(cfg.model_copy(update={"out_dir": None, "progress": False}))

    def dense(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """The dense row (as a dict), the resolved settings and the environment."""
        row, resolved, env = self.session.dense()
        return asdict(row), resolved, env

    def calibration(self) -> tuple[Any, dict[str, Any]]:
        """The shared calibration history (on the CPU, for the object store) and its info."""
        import torch

        store, info = self.session.calibration()
        return store.to(torch.device("cpu")), info

    def method(
        self, index: int, dense_row: dict[str, Any], calibration: tuple[Any, dict[str, Any]] | None
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Method ``index``'s row (as a dict) and the calibration info it used."""
        if calibration is not None and self.session.calibration_info is None:
            store, info = calibration
            self.session.use_calibration(store, info)
        row = self.session.method(index, MethodResult(**dense_row))
        info = self.session.calibration_info if self.session.cfg.methods[index].needs_calibration else None
        return asdict(row), info

    def pid(self) -> int:
        """The worker's process id."""
        return os.getpid()


def check_address(address: str | None, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse ``--address`` when nothing accepts a TCP connection at its host and port within
    ``timeout_s`` seconds.

    ``auto``, ``local`` and None (found or started by Ray itself) are not checked; ``ray://HOST:PORT``
    and ``HOST:PORT`` are.
    """
    if address is None or address in ("auto", "local"):
        return
    target = address.removeprefix("ray://")
    host, sep, port_text = target.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ConfigError(
            f"--address: {address!r} is not auto, HOST:PORT or ray://HOST:PORT (e.g. 10.0.0.5:6379)"
        )
    host = host.strip("[]")  # an IPv6 literal
    try:
        with socket.create_connection((host, int(port_text)), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
        raise ConfigError(
            f"--address: could not connect to the cluster at {address!r} within {timeout_s:g} s ({reason}); "
            "check the address and that the cluster is running (`ray start --head` prints it)"
        ) from None


def check_resources_fit(ray: Any, resources: WorkerResources) -> None:
    """Refuse ``resources`` that no node of the cluster can give one worker (Ray would wait forever).

    Compares each worker's request (CPUs, GPUs, memory) with every live node's total resources
    (``ray.nodes()``; the cluster's totals when that is not available) and raises a
    :class:`ConfigError` naming the field, the request and the largest node's amount.
    """
    wanted = {"CPU": resources.cpus, "GPU": resources.gpus}
    if resources.memory_gb:
        wanted["memory"] = resources.memory_gb * 2**30
    nodes_of = getattr(ray, "nodes", None)
    nodes = [n.get("Resources", {}) for n in nodes_of() if n.get("Alive", True)] if nodes_of else []
    if not nodes:
        nodes = [ray.cluster_resources()]
    if any(all(node.get(k, 0.0) >= v for k, v in wanted.items() if v) for node in nodes):
        return
    fields = {"CPU": ("resources.cpus", 1.0, "CPU(s)"), "GPU": ("resources.gpus", 1.0, "GPU(s)")}
    fields["memory"] = ("resources.memory_gb", 2.0**30, "GiB of memory")
    problems = []
    for key, value in wanted.items():
        largest = max(node.get(key, 0.0) for node in nodes)
        if value and largest < value:
            name, scale, unit = fields[key]
            problems.append(
                f"{name}: each worker asks for {value / scale:g} {unit}, but the largest node of the cluster "
                f"has {largest / scale:.3g} {unit}"
            )
    if not problems:  # every amount exists somewhere, but never all on one node
        problems.append(f"resources: no single node of the cluster has all of {wanted} for one worker")
    raise ConfigError("; ".join(problems) + " (Ray would wait for such a node forever); lower the request")


def worker_count(ray: Any, resources: WorkerResources, pending: int) -> int:
    """Workers to start: ``resources.workers``, else as many as the cluster's resources allow (at
    least one, at most one per pending point)."""
    if resources.workers:
        return max(1, min(resources.workers, max(pending, 1)))
    cluster = ray.cluster_resources()
    fits = [cluster.get("CPU", 0.0) / resources.cpus]
    if resources.gpus:
        fits.append(cluster.get("GPU", 0.0) / resources.gpus)
    if resources.memory_gb:
        fits.append(cluster.get("memory", 0.0) / (resources.memory_gb * 2**30))
    return max(1, min(int(math.floor(min(fits) + 1e-9)), max(pending, 1)))


def _actor_options(resources: WorkerResources) -> dict[str, Any]:
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    options: dict[str, Any] = {
        "num_cpus": resources.cpus,
        "num_gpus": resources.gpus,
        "max_restarts": 0,
        "max_task_retries": 0,
        "runtime_env": {"env_vars": env} if env else None,
    }
    if resources.memory_gb:
        options["memory"] = int(resources.memory_gb * 2**30)
    return {k: v for k, v in options.items() if v is not None}


def run_ray(
    cfg: RunConfig,
    *,
    resources: WorkerResources | None = None,
    address: str | None = None,
    store: PointStore | None = None,
    rerun: bool = False,
    progress: bool | None = None,
    method_fields: list[str] | None = None,
    extra_settings: dict[str, Any] | None = None,
    worker_cls: type[PointWorker] = PointWorker,
) -> RunReport:
    """Run dense and every method of ``cfg`` on a Ray cluster; the report equals :func:`run`'s.

    Args:
        cfg: the validated run config (checked again by preflight before the cluster is touched).
        resources: what each worker asks for (default one CPU, no GPU).
        address: the cluster to join (``auto``, ``ray://host:10001``, ``host:6379``); None starts a local
            one unless Ray is already initialised in this process (it is then used as is).
        store: the point store (finished points are reused unless ``rerun``).
        rerun: run every point again.
        progress: show a progress bar over the points (default ``cfg.progress``).
        method_fields: names of the methods for error messages.
        extra_settings: merged into the report's settings.
        worker_cls: the worker class (a subclass may add behaviour, e.g. in tests).
    """
    ray = import_ray()
    progress = cfg.progress if progress is None else progress
    resources = resources or WorkerResources()
    start = time.perf_counter()
    preflight(cfg, method_fields=method_fields)
    started_here = False
    with hold_out_dir(cfg.out_dir) if cfg.out_dir else nullcontext():
        if not ray.is_initialized():
            check_address(address)
            try:
                ray.init(address=address, log_to_driver=True, include_dashboard=False)
            except Exception as exc:
                if address:
                    message = f"--address: could not connect to the cluster at {address!r}"
                else:
                    message = "--launcher ray: could not start a local Ray cluster"
                raise ConfigError(f"{message}: {describe_error(exc, RAY_ERROR_CHARS)}") from None
            started_here = True
        try:
            check_resources_fit(ray, resources)
            return _sweep(
                ray, cfg, resources, address, store, rerun, progress, start, extra_settings or {}, worker_cls
            )
        finally:
            if started_here:
                ray.shutdown()


def _sweep(
    ray: Any,
    cfg: RunConfig,
    resources: WorkerResources,
    address: str | None,
    store: PointStore | None,
    rerun: bool,
    progress: bool,
    start: float,
    extra_settings: dict[str, Any],
    worker_cls: type[PointWorker],
) -> RunReport:
    keys = PointKeys.of(cfg)
    reuse = store is not None and not rerun
    rows: list[MethodResult | None] = [None] * len(cfg.methods)
    resumed: list[str] = []
    calibration_info: dict[str, Any] | None = None
    for index, method in enumerate(cfg.methods):
        stored = load_method(store, keys.methods[index]) if reuse and store else None
        if stored is not None:
            rows[index], info = stored
            calibration_info = calibration_info or info
            resumed.append(method.label)
    pending = deque(i for i, row in enumerate(rows) if row is None)
    stored_dense = load_dense(store, keys.dense) if reuse and store else None
    n_workers = worker_count(ray, resources, len(pending) or 1) if pending or stored_dense is None else 0
    threads = max(1, int(resources.cpus))
    actor_cls = ray.remote(worker_cls).options(**_actor_options(resources)) if n_workers else None
    actors = [actor_cls.remote(cfg, threads) for _ in range(n_workers)] if actor_cls else []
    logger.info("ray: %d worker(s), %d point(s) to run, %d reused", n_workers, len(pending), len(resumed))

    calibration_ref = None
    if any(cfg.methods[i].needs_calibration for i in pending):
        calibration_ref = actors[-1].calibration.remote()
    if stored_dense is not None:
        dense, resolved, env = stored_dense
        resumed.insert(0, "dense")
    else:
        try:
            dense_json, resolved, env = ray.get(actors[0].dense.remote())
        except Exception as exc:
            error = describe_error(exc, RAY_ERROR_CHARS)
            raise RuntimeError(f"dense evaluation failed on the Ray worker: {error}") from exc
        dense = MethodResult(**dense_json)
        if store is not None:
            save_dense(store, keys, dense, resolved, env)
    settings = {**cfg.model_dump(mode="json"), "resolved": resolved, **extra_settings}
    summary = {"workers": n_workers, "resources": resources.model_dump(), "address": address}

    def report(complete: bool) -> RunReport:
        done = [dense] + [row for row in rows if row is not None]
        sweep = sweep_summary("ray", store, resumed, **summary)
        return RunReport(done, settings, calibration_info, env, time.perf_counter() - start, complete, sweep)

    def save_partial() -> None:
        if cfg.out_dir:
            try_write_report(report(complete=False), cfg.out_dir)

    save_partial()
    bar = _progress_bar(len(pending), progress)
    idle = list(actors)
    running: dict[Any, tuple[Any, int]] = {}
    dense_json = asdict(dense)
    try:
        while pending or running:
            while pending and idle:
                actor, index = idle.pop(), pending.popleft()
                running[actor.method.remote(index, dense_json, calibration_ref)] = (actor, index)
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                actor, index = running.pop(ref)
                method = cfg.methods[index]
                info = None
                try:
                    row_json, info = ray.get(ref)
                    row = MethodResult(**row_json)
                    idle.append(actor)
                except ray.exceptions.RayError as exc:
                    error = describe_error(exc, RAY_ERROR_CHARS)
                    if isinstance(exc, ray.exceptions.RayActorError):
                        error = f"the Ray worker died: {error}"
                        if pending and actor_cls is not None:  # a fresh worker takes its place
                            idle.append(actor_cls.remote(cfg, threads))
                    else:  # e.g. the shared calibration failed on its worker
                        idle.append(actor)
                    row = MethodResult.failed(method.label, method.pruning.ratio, error)
                    logger.error("method %s failed: %s", method.label, error)
                rows[index] = row
                calibration_info = calibration_info or info
                if store is not None:
                    save_method(store, keys, index, row, info)
                save_partial()
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        for actor in actors + idle:
            try:
                ray.kill(actor)
            except Exception:  # already dead
                pass
    final = report(complete=True)
    if cfg.out_dir:
        try_write_report(final, cfg.out_dir)
    return final


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled or not total:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="points (ray)", unit="point")
