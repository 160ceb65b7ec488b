"""Sweep workers die with the sweep, even when it is killed with SIGKILL.

A local sweep runs its points in a process pool whose workers fork from a
forkserver.  Linux's PR_SET_PDEATHSIG makes a process receive a signal when
its parent dies: the forkserver asks for SIGKILL when the sweep dies (this
module is preloaded there), and each worker when the forkserver dies (the
pool's initializer).  Nothing is left behind.  Elsewhere than Linux it does
nothing.
"""

from __future__ import annotations

import os
import signal

PR_SET_PDEATHSIG = 1
SWEEP_PID = "THPCOW_SWEEP_PID"          # set by the sweep to its own pid before it starts the pool


def die_with_parent() -> None:
    """prctl(PR_SET_PDEATHSIG, SIGKILL) for this process (a no-op where prctl is missing)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return


# Imported in the forkserver (preloaded): tie it to the sweep.  Not in the sweep itself.
if os.environ.get(SWEEP_PID) and os.environ[SWEEP_PID] != str(os.getpid()):
    die_with_parent()
