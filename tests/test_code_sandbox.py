"""The code-execution sandbox: statuses, limits, blocked actions, order, and isolation by the kernel.

The escape tests (``test_escape_*``) run the evaluator in a child process (``_evaluate_in_child``: the
sandbox module loaded alone, no torch, so it starts in a fraction of a second) with a secret in its
environment, and check that it survives, returns every item's result, leaves no sandbox folder in its
temporary directory and never shows the secret. ``PPF_SANDBOX_UNDER_TEST=/path/to/sandbox.py`` points
those child evaluators at another copy of the module (to check that the tests fail on an older one).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from ppframework.api import load_config
from ppframework.errors import ConfigError
from ppframework.generation import sandbox
from ppframework.generation.evaluation import check_code_execution
from ppframework.generation.sandbox import SandboxUnavailableError, run_program, run_programs

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")

SECRET_NAME = "PPF_SANDBOX_TEST_SECRET"
SECRET = "s3cret-" + "7f3a9c"
CONTROL = "def add(a, b):\n    return a + b\nassert add(2, 3) == 5\n"
SANDBOX_FILE = os.environ.get("PPF_SANDBOX_UNDER_TEST", sandbox.__file__)
NOBODY = 65534

# Loads the sandbox module without the ppframework package (only ppframework.errors, stubbed), runs
# the JSON list of programs on stdin (with @EVALUATOR_PID@ replaced by its own pid) and prints results.
_CHILD = """
import importlib.util, json, os, sys, types
pkg = types.ModuleType("ppframework")
pkg.__path__ = []
errors = types.ModuleType("ppframework.errors")
class ConfigError(ValueError):
    pass
errors.ConfigError = ConfigError
sys.modules.update({"ppframework": pkg, "ppframework.errors": errors})
spec = importlib.util.spec_from_file_location("sandbox_under_test", sys.argv[1])
module = sys.modules["sandbox_under_test"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sources = [s.replace("@EVALUATOR_PID@", str(os.getpid())) for s in json.load(sys.stdin)]
results = module.run_programs(sources, workers=2, timeout_s=float(sys.argv[2]))
print(json.dumps([[r.status, r.detail] for r in results]))
"""


def _evaluate_in_child(
    sources: list[str],
    tmpdir: Path,
    *,
    timeout_s: float = 5.0,
    python: str = sys.executable,
    as_user: int | None = None,
) -> tuple[int, list[list[str]] | None, str]:
    """Run ``sources`` through a child evaluator; (its exit code, [status, detail] per item, output)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TMPDIR": str(tmpdir), SECRET_NAME: SECRET}
    prefix: list[str] = []
    if as_user is not None:
        prefix = ["setpriv", f"--reuid={as_user}", f"--regid={as_user}", "--clear-groups", "--"]
    proc = subprocess.run(
        [*prefix, python, "-I", "-c", _CHILD, SANDBOX_FILE, str(timeout_s)],
        input=json.dumps(sources),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    output = proc.stdout + proc.stderr
    results = json.loads(proc.stdout.splitlines()[-1]) if proc.returncode == 0 and proc.stdout else None
    return proc.returncode, results, output


def _survivors(marker: str) -> list[int]:
    """Pids of processes whose command line contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.append(int(entry))
    return found


@pytest.fixture
def evaluator_tmp(tmp_path: Path) -> Path:
    """The child evaluator's temporary directory (must be empty again afterwards)."""
    path = tmp_path / "evaluator-tmp"
    path.mkdir()
    return path


def _assert_evaluator_intact(
    rc: int, results: list[list[str]] | None, output: str, tmpdir: Path, n: int
) -> None:
    assert rc == 0, f"the evaluator died (exit code {rc}): {output[-1500:]}"
    assert results is not None and len(results) == n, output[-1500:]
    assert results[0][0] == "passed", results[0]  # the control item
    assert SECRET not in output
    assert not [p.name for p in tmpdir.iterdir() if p.name.startswith("ppf-sandbox-")]


def test_correct_program_passes_and_wrong_one_fails() -> None:
    ok = run_program("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\n", timeout_s=10)
    assert ok.passed and ok.status == "passed"
    bad = run_program("def add(a, b):\n    return a - b\nassert add(2, 3) == 5\n", timeout_s=10)
    assert not bad.passed and bad.status == "failed"
    assert "AssertionError" in bad.detail


def test_exit_before_the_end_is_a_failure() -> None:
    for source in ("exit(0)\nassert False\n", "raise SystemExit(1)\n", "import os\nos._exit(3)\n"):
        result = run_program(source, timeout_s=10)
        assert result.status == "failed", (source, result)


def test_infinite_loop_times_out_and_its_process_group_is_gone() -> None:
    result = run_program("while True:\n    pass\n", timeout_s=1.0)
    assert result.status == "timeout" and not result.passed
    assert result.pid is not None
    assert 0.9 < result.duration_s < 8.0
    with pytest.raises(ProcessLookupError):
        os.killpg(result.pid, 0)


def test_segfault_is_contained_and_ctypes_is_blocked() -> None:
    crashed = run_program("import faulthandler\nfaulthandler._sigsegv()\n", timeout_s=10)
    assert crashed.status == "crashed" and "SIGSEGV" in crashed.detail
    blocked = run_program("import ctypes\nctypes.string_at(0)\n", timeout_s=10)
    assert blocked.status == "blocked" and "ctypes" in blocked.detail


def test_write_outside_the_working_directory_is_blocked(tmp_path: Path) -> None:
    target = tmp_path / "escape.txt"
    # Even a program that catches every exception cannot get past the hook.
    source = f"try:\n    open({str(target)!r}, 'w').write('x')\nexcept BaseException:\n    pass\n"
    result = run_program(source, timeout_s=10)
    assert result.status == "blocked" and "open" in result.detail
    assert not target.exists()
    keep = tmp_path / "keep.txt"
    keep.write_text("keep")
    for source in (
        f"import os\nos.remove({str(keep)!r})\n",
        f"open({str(keep)!r}, 'a').write('x')\n",
        f"import os\nopen('a', 'w').close()\nos.rename('a', {str(tmp_path / 'b')!r})\n",
    ):
        assert run_program(source, timeout_s=10).status == "blocked", source
    assert keep.read_text() == "keep" and not (tmp_path / "b").exists()


def test_writing_inside_the_working_directory_works_and_it_is_deleted() -> None:
    source = (
        "import os, sys\n"
        "open('out.txt', 'w').write('hello')\n"
        "assert open('out.txt').read() == 'hello'\n"
        "os.mkdir('sub'); os.rename('out.txt', 'sub/out.txt'); os.remove('sub/out.txt'); os.rmdir('sub')\n"
        "import tempfile\n"
        "with tempfile.NamedTemporaryFile() as f:\n    f.write(b'x')\n"
        "sys.stderr.write('CWD=' + os.getcwd() + '\\n')\n"
        "raise SystemExit(2)\n"
    )
    result = run_program(source, timeout_s=10)
    assert result.status == "failed", result
    match = re.search(r"CWD=(\S+)", result.detail)
    assert match, result.detail
    assert not Path(match.group(1)).exists()


def test_network_and_process_creation_are_blocked() -> None:
    sources = {
        "socket": "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)\n",
        "getaddrinfo": "import socket\nsocket.getaddrinfo('localhost', 80)\n",
        "subprocess": "import subprocess\nsubprocess.run(['true'])\n",
        "os.system": "import os\nos.system('true')\n",
        "os.fork": "import os\nos.fork()\n",
        "os.kill": "import os\nos.kill(os.getppid(), 0)\n",
    }
    results = run_programs(list(sources.values()), workers=2, timeout_s=10)
    for name, result in zip(sources, results, strict=True):
        assert result.status == "blocked", (name, result)


def test_huge_allocation_hits_the_memory_limit() -> None:
    result = run_program("x = bytearray(8 * 1024 ** 3)\n", timeout_s=10, memory_mb=256)
    assert result.status in ("failed", "crashed") and "MemoryError" in result.detail
    small = run_program("x = bytearray(16 * 1024 ** 2)\nassert len(x) > 0\n", timeout_s=10, memory_mb=256)
    assert small.passed


def test_environment_is_minimal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PPF_SANDBOX_TEST_SECRET", "s3cret")
    source = "import os, sys\nassert 'PPF_SANDBOX_TEST_SECRET' not in os.environ\n"
    source += "assert sys.stdin.read() == ''\nassert os.environ['HOME'] == os.getcwd()\n"
    assert run_program(source, timeout_s=10).passed


def test_run_programs_keeps_order() -> None:
    sources = ["import time\ntime.sleep(0.3)\n", "assert False\n", "pass\n", "raise ValueError('x')\n"]
    results = run_programs(sources, workers=2, timeout_s=10)
    assert [r.status for r in results] == ["passed", "failed", "passed", "failed"]
    assert "ValueError" in results[3].detail
    assert run_programs([]) == []


# --- Escapes known in the audit-hook-only sandbox (issue "Reliability III", item 1) -------------------


def test_escape_rebinding_os_exit_does_not_disable_the_checks(tmp_path: Path, evaluator_tmp: Path) -> None:
    target = tmp_path / "escape1.txt"
    escape = f"import os\nos._exit = lambda code: None\nopen({str(target)!r}, 'w').write('escaped')\n"
    rc, results, output = _evaluate_in_child([CONTROL, escape], evaluator_tmp)
    _assert_evaluator_intact(rc, results, output, evaluator_tmp, 2)
    assert results is not None and results[1][0] in ("blocked", "failed"), results[1]
    assert not target.exists()


def test_escape_fork_exec_cannot_write_outside_or_outlive_the_item(
    tmp_path: Path, evaluator_tmp: Path
) -> None:
    target = tmp_path / "escape2.txt"
    marker = "31.41592"
    # multiprocessing's spawn path: _posixsubprocess.fork_exec raises no audit event.
    escape = (
        "import os, time\n"
        "from multiprocessing.util import spawnv_passfds\n"
        f"script = 'echo escaped > {target}; setsid sleep {marker} & sleep 0.3'\n"
        "pid = spawnv_passfds(b'/bin/sh', [b'sh', b'-c', script.encode()], [])\n"
        "os.waitpid(pid, 0)\n"
    )
    try:
        rc, results, output = _evaluate_in_child([CONTROL, escape], evaluator_tmp)
        survivors = _survivors(marker)
        _assert_evaluator_intact(rc, results, output, evaluator_tmp, 2)
        assert not target.exists()
        assert survivors == [], f"a process started by the program outlived it: {survivors}"
    finally:
        for pid in _survivors(marker):  # only on a broken sandbox: the sleep this test started
            os.kill(pid, signal.SIGKILL)


def test_escape_killing_the_evaluator_is_impossible(tmp_path: Path, evaluator_tmp: Path) -> None:
    literal = (  # the program: the hook "disabled", then SIGTERM to the parent
        "import os, signal, time\n"
        "os._exit = lambda code: None\n"
        "os.kill(os.getppid(), signal.SIGTERM)\n"
        "time.sleep(0.3)\n"
    )
    bypass = (  # no audit event at all: a shell started through fork_exec sends the signals
        "import os\n"
        "from multiprocessing.util import spawnv_passfds\n"
        "script = f'kill -TERM {os.getppid()} @EVALUATOR_PID@; sleep 0.3'\n"
        "os.waitpid(spawnv_passfds(b'/bin/sh', [b'sh', b'-c', script.encode()], []), 0)\n"
    )
    rc, results, output = _evaluate_in_child([CONTROL, literal, bypass, CONTROL], evaluator_tmp)
    _assert_evaluator_intact(rc, results, output, evaluator_tmp, 4)
    assert results is not None and results[3][0] == "passed"


def test_escape_the_evaluators_environment_is_not_readable(evaluator_tmp: Path) -> None:
    escape = (
        "import os, sys\n"
        "pids = {os.getppid(), @EVALUATOR_PID@} | {int(p) for p in os.listdir('/proc') if p.isdigit()}\n"
        "for pid in sorted(pids):\n"
        "    try:\n"
        "        data = open(f'/proc/{pid}/environ', 'rb').read()\n"
        "    except OSError as exc:\n"
        "        print(pid, exc, file=sys.stderr)\n"
        "        continue\n"
        "    found = [v for v in data.split(b'\\0') if v.startswith(b'PPF_SANDBOX_TEST_SECRET')]\n"
        "    print(pid, found, file=sys.stderr)\n"
        "raise SystemExit(3)\n"
    )
    rc, results, output = _evaluate_in_child([CONTROL, escape], evaluator_tmp)
    _assert_evaluator_intact(rc, results, output, evaluator_tmp, 2)  # checks the secret is nowhere
    assert results is not None and results[1][0] == "failed"


def test_escape_dir_fd_write_outside_the_folder_is_refused(tmp_path: Path, evaluator_tmp: Path) -> None:
    target = tmp_path / "escape5.txt"
    escape = (
        "import os\n"
        "root = os.open('/', os.O_RDONLY)\n"
        f"fd = os.open({str(target)[1:]!r}, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=root)\n"
        "os.write(fd, b'escaped')\n"
    )
    rc, results, output = _evaluate_in_child([CONTROL, escape], evaluator_tmp)
    _assert_evaluator_intact(rc, results, output, evaluator_tmp, 2)
    assert results is not None and results[1][0] == "failed" and "Read-only file system" in results[1][1]
    assert not target.exists()


def test_escape_the_pass_verdict_cannot_be_forged(evaluator_tmp: Path) -> None:
    token = (  # the bootstrap's token, printed where the old sandbox looked for it, then exit 0
        "import __main__, os, sys\n"
        "sys.stderr.write('\\n' + str(getattr(__main__, '_ppf_token', 'PPF-SANDBOX-DONE-0')))\n"
        "sys.stderr.flush()\n"
        "os._exit(0)\n"
        "assert False\n"
    )
    rerun = (  # run the bootstrap's end again from inside the program
        "import __main__\n"
        "for name in ('_ppf_main', '_ppf_sandbox'):\n"
        "    if hasattr(__main__, name):\n"
        "        getattr(__main__, name)()\n"
        "assert False, 'not solved'\n"
    )
    exits = ["exit(0)\nassert False\n", "import sys\nsys.exit()\nassert False\n"]
    rc, results, output = _evaluate_in_child([CONTROL, token, rerun, *exits], evaluator_tmp)
    _assert_evaluator_intact(rc, results, output, evaluator_tmp, 5)
    assert results is not None
    assert [r[0] for r in results[1:]] == ["failed"] * 4, results


def test_escape_code_tasks_need_the_opt_in() -> None:
    def cfg(tasks: list[str], **gen: Any) -> Any:
        return load_config({"evaluation": {"generation": {"enabled": True, "tasks": tasks, **gen}}})

    for tasks in (["humaneval"], ["xsum", "mbpp"]):
        with pytest.raises(ConfigError, match=r"evaluation\.generation\.allow_code_execution"):
            check_code_execution(cfg(tasks))
    check_code_execution(cfg(["xsum"]))  # no code, no opt-in needed
    check_code_execution(cfg(["humaneval", "mbpp"], allow_code_execution=True))  # this machine isolates
    assert load_config({}).evaluation.generation.allow_code_execution is False


# --- The kernel's isolation, without the audit hook's help ---------------------------------------------


def test_a_hook_free_child_has_no_network_no_writes_and_no_view_of_the_host() -> None:
    # A Python started through fork_exec (no audit event, no hook of its own) probes the kernel.
    probe = (
        "import os, socket\n"
        "out = {'ifaces': [n for _, n in socket.if_nameindex()]}\n"
        "out['procs'] = sorted(p for p in os.listdir('/proc') if p.isdigit())\n"
        "try:\n"
        "    socket.create_connection(('1.1.1.1', 53), timeout=2)\n"
        "except OSError as exc:\n"
        "    out['connect'] = str(exc)\n"
        "try:\n"
        "    open('/tmp/ppf-sandbox-escape', 'w')\n"
        "except OSError as exc:\n"
        "    out['write'] = str(exc)\n"
        "open('probe.txt', 'w').write(repr(out))\n"
    )
    source = (
        "import ast, os, sys\n"
        "from multiprocessing.util import spawnv_passfds\n"
        f"argv = [sys.executable.encode(), b'-I', b'-c', {probe!r}.encode()]\n"
        "os.waitpid(spawnv_passfds(sys.executable.encode(), argv, []), 0)\n"
        "out = ast.literal_eval(open('probe.txt').read())\n"
        "assert out['ifaces'] == ['lo'], out\n"
        "assert len(out['procs']) == 3, out  # the init, the program and the probe\n"
        "assert 'unreachable' in out['connect'], out\n"
        "assert 'Read-only' in out['write'], out\n"
    )
    result = run_program(source, timeout_s=10)
    assert result.passed, result
    assert not Path("/tmp/ppf-sandbox-escape").exists()


def test_unavailable_namespaces_are_refused_with_how_to_enable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "unshare").write_text(
        "#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n"
    )
    (fake / "unshare").chmod(0o755)
    real_setpriv = shutil.which("setpriv")
    if real_setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    (fake / "setpriv").symlink_to(real_setpriv)
    monkeypatch.setattr(sandbox, "_TOOL_PATH", str(fake))
    monkeypatch.setattr(sandbox, "_mode", None)
    monkeypatch.setattr(sandbox, "_mode_error", None)
    with pytest.raises(SandboxUnavailableError, match="unprivileged_userns_clone") as info:
        run_programs(["pass\n"])
    assert "Operation not permitted" in str(info.value)
    with pytest.raises(SandboxUnavailableError):  # remembered, not probed again
        sandbox.check_sandbox()


def _python_for_nobody() -> tuple[str | None, str]:
    """A Python >= 3.10 that user nobody can run inside new namespaces, or None and why not."""
    unshare = ["unshare", "--user", "--map-root-user", "--pid", "--net", "--mount", "--fork", "--"]
    why = ""
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        probe = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--", *unshare]
        probe += [candidate, "-I", "-c", "import sys; assert sys.version_info >= (3, 10)"]
        try:
            run = subprocess.run(probe, capture_output=True, text=True, timeout=30, cwd="/")
        except (OSError, subprocess.TimeoutExpired) as exc:
            why = str(exc)
            continue
        if run.returncode == 0:
            return candidate, ""
        why = run.stderr.strip()[-300:]
    return None, why


def test_isolation_holds_for_an_unprivileged_evaluator() -> None:
    if os.geteuid() != 0:
        pytest.skip("the suite already runs unprivileged; the escape tests above are the check")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    python, why = _python_for_nobody()
    if python is None:
        pytest.skip(f"user nobody ({NOBODY}) cannot run a Python >= 3.10 in new namespaces here: {why}")
    if not os.access(SANDBOX_FILE, os.R_OK) or not all(
        os.stat(p).st_mode & 0o005 for p in Path(SANDBOX_FILE).resolve().parents
    ):
        pytest.skip(f"user nobody cannot read {SANDBOX_FILE}")
    base = Path(tempfile.mkdtemp(prefix="ppf-sandbox-test-"))
    try:
        os.chown(base, NOBODY, NOBODY)
        tmpdir = base / "tmp"
        tmpdir.mkdir()
        os.chown(tmpdir, NOBODY, NOBODY)
        target = base / "escape.txt"
        marker = "27.18281"
        spawn = (  # fork_exec: no audit event; a new session; a write outside; a signal to the evaluator
            "import os\n"
            "from multiprocessing.util import spawnv_passfds\n"
            f"script = 'echo escaped > {target}; kill -TERM @EVALUATOR_PID@; '\n"
            f"script += 'setsid sleep {marker} & sleep 0.3'\n"
            "os.waitpid(spawnv_passfds(b'/bin/sh', [b'sh', b'-c', script.encode()], []), 0)\n"
        )
        dir_fd = (
            "import os\n"
            "root = os.open('/', os.O_RDONLY)\n"
            f"os.open({str(target)[1:]!r}, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=root)\n"
        )
        environ = (
            "import sys\n"
            "for pid in {__import__('os').getppid(), @EVALUATOR_PID@}:\n"
            "    try:\n"
            "        print(open(f'/proc/{pid}/environ').read(), file=sys.stderr)\n"
            "    except OSError as exc:\n"
            "        print(exc, file=sys.stderr)\n"
            "raise SystemExit(3)\n"
        )
        kill = (
            "import os, signal, time\nos._exit = lambda code: None\nos.kill(os.getppid(), signal.SIGTERM)\n"
        )
        kill += "time.sleep(0.3)\n"
        sources = [CONTROL, spawn, dir_fd, environ, kill]
        rc, results, output = _evaluate_in_child(sources, tmpdir, python=python, as_user=NOBODY)
        survivors = _survivors(marker)
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)
        if rc != 0 and "SandboxUnavailableError" in output:
            # The kernel refuses namespaces to unprivileged users here: the refusal must say how to fix it.
            assert "unprivileged_userns_clone" in output, output[-1500:]
            pytest.skip("unprivileged user namespaces are disabled here (refused with instructions)")
        _assert_evaluator_intact(rc, results, output, tmpdir, 5)
        assert results is not None and [r[0] for r in results[2:4]] == ["failed"] * 2, results
        assert not target.exists() and survivors == []
    finally:
        shutil.rmtree(base, ignore_errors=True)
