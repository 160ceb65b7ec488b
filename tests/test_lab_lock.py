"""lab_lock(): one real-kernel measurement at a time across processes, reentrant within one."""

from __future__ import annotations

import subprocess
import sys
import textwrap

NESTED = textwrap.dedent("""
    from thpcow.lab.scenario import lab_lock
    with lab_lock():
        with lab_lock():
            pass
        with lab_lock():
            pass
    print("ok")
""")

EXCLUSIVE = textwrap.dedent("""
    import os, sys, time
    from thpcow.lab.scenario import lab_lock, LOCK_PATH
    import fcntl
    with lab_lock():
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                      # a forked child does not inherit the hold: it must wait
            fd = os.open(LOCK_PATH, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.write(w, b"got")
            except BlockingIOError:
                os.write(w, b"blocked")
            os._exit(0)
        os.waitpid(pid, 0)
        print(os.read(r, 16).decode())
""")


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_a_process_that_holds_the_lock_can_take_it_again():
    assert _run(NESTED) == "ok"


def test_another_process_cannot_take_the_lock_while_it_is_held():
    assert _run(EXCLUSIVE) == "blocked"
