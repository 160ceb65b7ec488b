"""trace: replay a recorded trace of memory operations (CSV or Parquet).

Trace format: one row per operation, in time order, with these columns
(CSV with a header line, or Parquet with these column names):

==========  =========================================================================
column      meaning
==========  =========================================================================
time_ns     integer, simulated time in ns; never decreasing
pid         integer, the traced process (any numbering; a pid first seen in a row
            other than as a fork's child is spawned, as after execve)
op          ``mmap``, ``munmap``, ``madvise``, ``write``, ``read``, ``fork``, ``exit``
address     integer (CSV: decimal or ``0x`` hex): mmap: the address the traced process
            got; munmap/madvise/write/read: the start address; fork/exit: ignored
length      integer bytes: mmap/munmap/madvise/write/read; fork/exit: ignored
arg         optional: madvise: the advice (``hugepage``, ``MADV_HUGEPAGE`` or its
            number); fork: the child's pid (required); write: the token stored
            (default: the row number); otherwise ignored
==========  =========================================================================

Addresses are the traced process's own: the replay maps each ``mmap`` where
the simulated kernel puts it and translates later addresses into the same
place of that mapping (a forked child inherits its parent's mappings, as
fork does).  ``munmap`` must cover exactly one earlier mapping.  A write or
read of ``length`` bytes is one store/load per page it touches.  Consecutive
writes (or reads) of one pid to one mapping within ``batch_ms`` of the first
become one batch (one kernel call), issued at the first one's time.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from ..kernel.constants import MADV_NAMES
from .base import Param, Workload, ms, page_offsets
from .ops import END, EXIT, FORK, MADVISE, MMAP, MUNMAP, READ, SPAWN, WRITE, Op

TRACE_COLUMNS = ("time_ns", "pid", "op", "address", "length")
TRACE_OPS = ("mmap", "munmap", "madvise", "write", "read", "fork", "exit")
_ADVICE = {name[len("MADV_"):].lower(): val for val, name in MADV_NAMES.items()}


def read_trace(path: str):
    """The trace as a pandas DataFrame with the documented columns (``arg`` as text)."""
    import pandas as pd

    if not os.path.exists(path):
        raise ValueError(f"workload trace: parameter path={path!r}: no such file")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        df = pd.read_parquet(path)
    elif ext in (".csv", ".txt"):
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    else:
        raise ValueError(f"workload trace: parameter path={path!r}: expected a .csv or .parquet file")
    missing = [c for c in TRACE_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"workload trace: {path}: missing column(s) {', '.join(missing)}; "
                         f"expected {', '.join(TRACE_COLUMNS)}[, arg]")
    return df


def _int(path: str, row: int, col: str, val) -> int:
    if isinstance(val, (int, np.integer)):
        return int(val)
    text = str(val).strip()
    try:
        return int(text, 0)
    except ValueError:
        raise ValueError(f"trace {path}: row {row}: {col}={text!r} is not an integer") from None


def _advice(path: str, row: int, val) -> int:
    from ..kernel.madvise import advice_modelled

    text = str(val).strip()
    key = text.lower().removeprefix("madv_")
    if key in _ADVICE:
        advice = _ADVICE[key]
    else:
        try:
            advice = int(text, 0)
        except ValueError:
            raise ValueError(f"trace {path}: row {row}: madvise arg={text!r} is not an advice "
                             f"(e.g. hugepage, nohugepage, dontfork, collapse)") from None
    if not advice_modelled(advice):
        raise ValueError(f"trace {path}: row {row}: madvise arg={text!r}: the simulator does not model "
                         "this advice yet")
    return advice


class Trace(Workload):
    """Replay of a recorded trace (format: the module docstring of :mod:`thpcow.workloads.trace`).

    Rows up to the first fork are phase ``setup``; the rest are ``run``.
    """

    name = "trace"
    help = "replay a CSV or Parquet trace: time_ns, pid, op, address, length[, arg] (format: thpcow.workloads.trace)"
    measure_phase = "run"
    params = {
        "path": Param(None, "the trace file (.csv or .parquet); relative paths are relative to the scenario file",
                      required=True),
        "batch_ms": Param(1.0, "writes/reads of one pid within this window form one batch (ms)", lo=0),
    }

    def check(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"workload {self.name}: parameter path is required")
        if not os.path.isfile(self.path):
            raise ValueError(f"workload {self.name}: parameter path={self.path!r}: no such file")

    def validate(self) -> None:
        """Read and check every row once (the ops, without running them)."""
        for _op in self.ops():
            pass

    def _frame(self):
        """The trace, read once per workload object (the runner asks for its duration, then its ops)."""
        if getattr(self, "_trace", None) is None:
            self._trace = read_trace(self.path)
        return self._trace

    def duration_ns(self) -> int:
        df = self._frame()
        return _int(self.path, len(df), "time_ns", df["time_ns"].iloc[-1]) if len(df) else 0

    def ops(self, seed: int = 0) -> Iterator[Op]:
        """Validates every row (ValueError naming the row) while it yields the ops."""
        df = self._frame()
        cols = [df[c].tolist() for c in TRACE_COLUMNS]
        args = df["arg"].tolist() if "arg" in df.columns else [""] * len(df)
        pids: dict[int, int] = {}                  # traced pid -> workload pid
        maps: dict[int, dict[int, tuple[int, int]]] = {}   # workload pid -> {trace start: (region, length)}
        nregions = 0
        phase = "setup"
        last_t = 0
        batch: dict | None = None
        window = ms(self.batch_ms)
        path = self.path

        def flush():
            """The pending batch as one op (nothing when there is none)."""
            nonlocal batch
            if batch is None:
                return
            b, batch = batch, None
            offs = np.concatenate(b["offs"])
            kind = WRITE if b["kind"] == "write" else READ
            yield Op(b["t"], kind, b["pid"], b["phase"], region=b["region"], offsets=offs,
                     token=b["token"], nbytes=b["nbytes"])

        def locate(row: int, wpid: int, addr: int, length: int) -> tuple[int, int]:
            for start, (region, rlen) in maps[wpid].items():
                if start <= addr and addr + length <= start + rlen:
                    return region, addr - start
            raise ValueError(f"trace {path}: row {row}: [{addr:#x}, {addr + length:#x}) is not inside "
                             f"one mapping of pid {wpid_to_trace[wpid]}")

        wpid_to_trace: dict[int, int] = {}
        dead: set[int] = set()
        for i, (t_raw, pid_raw, op_raw, addr_raw, len_raw) in enumerate(zip(*cols)):
            row = i + 1
            t = _int(path, row, "time_ns", t_raw)
            tpid = _int(path, row, "pid", pid_raw)
            op = str(op_raw).strip().lower()
            if op not in TRACE_OPS:
                raise ValueError(f"trace {path}: row {row}: op={op_raw!r} is not one of {', '.join(TRACE_OPS)}")
            if t < last_t:
                raise ValueError(f"trace {path}: row {row}: time_ns={t} is before the previous row's {last_t}")
            last_t = t
            addr = _int(path, row, "address", addr_raw) if op not in ("fork", "exit") else 0
            length = _int(path, row, "length", len_raw) if op not in ("fork", "exit") else 0
            if op not in ("fork", "exit") and length <= 0:
                raise ValueError(f"trace {path}: row {row}: length={length} must be > 0")
            if tpid not in pids:
                if op == "exit":
                    raise ValueError(f"trace {path}: row {row}: pid {tpid} exits before it ran")
                yield from flush()
                wpid = len(pids)
                pids[tpid] = wpid
                wpid_to_trace[wpid] = tpid
                maps[wpid] = {}
                yield Op(t, SPAWN, wpid, phase)
            wpid = pids[tpid]
            if wpid in dead:
                raise ValueError(f"trace {path}: row {row}: pid {tpid} has exited")
            if op in ("write", "read"):
                region, off = locate(row, wpid, addr, length)
                offs = page_offsets(off, length)
                token = _int(path, row, "arg", args[i]) if op == "write" and str(args[i]).strip() else row
                same = (batch is not None and batch["kind"] == op and batch["pid"] == wpid
                        and batch["region"] == region and t < batch["t"] + max(window, 1)
                        and (op == "read" or batch["token"] == token))
                if not same:
                    yield from flush()
                    batch = {"kind": op, "pid": wpid, "region": region, "t": t, "phase": phase,
                             "offs": [], "token": token, "nbytes": 0}
                batch["offs"].append(offs)
                batch["nbytes"] += length
                continue
            yield from flush()
            if op == "mmap":
                if addr in maps[wpid]:
                    raise ValueError(f"trace {path}: row {row}: pid {tpid} already has a mapping at {addr:#x}")
                maps[wpid][addr] = (nregions, length)
                yield Op(t, MMAP, wpid, phase, region=nregions, length=length)
                nregions += 1
            elif op == "munmap":
                region, rlen = maps[wpid].get(addr, (-1, 0))
                if region < 0 or rlen != length:
                    raise ValueError(f"trace {path}: row {row}: munmap must cover exactly one mapping "
                                     f"(an mmap at {addr:#x} of {length} bytes)")
                del maps[wpid][addr]
                yield Op(t, MUNMAP, wpid, phase, region=region, length=length)
            elif op == "madvise":
                region, off = locate(row, wpid, addr, length)
                yield Op(t, MADVISE, wpid, phase, region=region, offset=off, length=length,
                         arg=_advice(path, row, args[i]))
            elif op == "fork":
                child = _int(path, row, "arg", args[i]) if str(args[i]).strip() else None
                if child is None or child in pids:
                    raise ValueError(f"trace {path}: row {row}: fork needs arg = a new child pid, got {args[i]!r}")
                cw = len(pids)
                pids[child] = cw
                wpid_to_trace[cw] = child
                maps[cw] = dict(maps[wpid])
                phase = "run"
                needs = tuple((r, 0, rl) for r, rl in maps[wpid].values())
                yield Op(t, FORK, wpid, phase, arg=cw, needs=needs)
            else:  # exit
                dead.add(wpid)
                yield Op(t, EXIT, wpid, phase)
        yield from flush()
        yield Op(last_t, END, 0, phase)


def write_trace(path: str, rows: list[tuple]) -> None:
    """Write rows of (time_ns, pid, op, address, length[, arg]) as a trace file (CSV or Parquet)."""
    import pandas as pd

    cols = list(TRACE_COLUMNS) + ["arg"]
    df = pd.DataFrame([tuple(r) + ("",) * (6 - len(r)) for r in rows], columns=cols)
    df["arg"] = df["arg"].astype(str)
    if path.endswith(".parquet"):
        df.to_parquet(path, index=False)
    else:
        df.to_csv(path, index=False)

