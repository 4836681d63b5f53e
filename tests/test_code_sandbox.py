"""The code-execution sandbox: statuses, time and memory limits, blocked actions, order."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from ppframework.generation.sandbox import run_program, run_programs

pytestmark = pytest.mark.skipif(not hasattr(os, "killpg"), reason="POSIX only")


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
