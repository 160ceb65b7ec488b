"""thpcow record: a real program's writes as a trace, replayed on the simulator.

The pure parts (page runs, the replay's mappings, row cutting) are tested without a kernel, and
so is the replay of a hand-made trace built with them.  The realkernel tests record a Python
program (PROGRAM below: an aligned MADV_HUGEPAGE region, filled, a fork, a child that writes a
seeded set of pages at strides in three bursts and exits), measure the real COW from the
program's own pagemap PFNs (child against parent) and the child's splits from its own smaps
(AnonHugePages before and after its writes), replay the recorded rows of the region on the
simulator, and compare: COW bytes within 5 %, thp_split_pmd equal.  Nothing system-wide enters
the comparison (no /proc/vmstat).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from thpcow.lab import procfs, ptrace, scenario
from thpcow.lab import record as rec
from thpcow.workloads.trace import read_trace, write_trace

from conftest import skip_without_real_thp

MiB = 1 << 20
PMD = 2 * MiB
PAGE = procfs.PAGE_SIZE


# -- pure helpers ---------------------------------------------------------------------------------------

def test_page_runs_merges_adjacent_pages_of_any_order():
    addrs = np.array([0x5000, 0x3000, 0x4000, 0x9000, 0x3000, 0xA000], dtype=np.uint64)
    assert rec.page_runs(addrs) == [(0x3000, 0x6000), (0x9000, 0xB000)]
    assert rec.page_runs(np.zeros(0, dtype=np.uint64)) == []


def test_merge_subtract_covered():
    assert rec.merge_ranges([(10, 20), (0, 5), (5, 8), (15, 30)]) == [(0, 8), (10, 30)]
    assert rec.subtract([(0, 100)], [(10, 20), (50, 60)]) == [(0, 10), (20, 50), (60, 100)]
    assert rec.subtract([(0, 10)], [(0, 10)]) == []
    assert rec.covered(10, 20, [(0, 15), (15, 25)])
    assert not rec.covered(10, 30, [(0, 15), (16, 40)])


def test_replay_pieces_give_the_pmd_aligned_middle_its_own_mapping():
    start = 5 * PMD - 3 * PAGE
    end = 9 * PMD + 7 * PAGE
    pieces = rec.replay_pieces(start, end, PMD)
    assert pieces == [(start, 5 * PMD), (5 * PMD, 9 * PMD), (9 * PMD, end)]
    assert rec.replay_pieces(4 * PMD, 6 * PMD, PMD) == [(4 * PMD, 6 * PMD)]       # aligned: one piece
    small = (PMD + PAGE, 3 * PMD - PAGE)                                          # no whole PMD inside
    assert rec.replay_pieces(*small, PMD) == [small]


def test_clip_rows_cuts_at_mappings_and_drops_the_rest():
    maps = [(0x1000, 0x3000), (0x3000, 0x5000)]
    assert rec.clip_rows([(0x0, 0x4000), (0x6000, 0x7000)], maps) == [(0x1000, 0x3000), (0x3000, 0x4000)]


def test_trace_rows_keep_time_order_and_count_bytes():
    tr = rec.TraceRows()
    tr.add(100, 1, "mmap", 0x1000, 0x4000)
    tr.add(90, 1, "madvise", 0x1000, 0x4000, "hugepage")        # late: takes the last row's time
    n = tr.writes(120, 1, "write", [(0x0, 0x2000), (0x2000, 0x3000)], [(0x1000, 0x5000)])
    assert n == 0x2000
    assert tr.rows == [(100, 1, "mmap", 0x1000, 0x4000, ""), (100, 1, "madvise", 0x1000, 0x4000, "hugepage"),
                       (120, 1, "write", 0x1000, 0x2000, "")]


def test_rows_in_range_cuts_rows_and_keeps_forks_and_exits():
    rows = [(0, 1, "mmap", 0, 10 * PAGE, ""), (1, 1, "write", 8 * PAGE, 4 * PAGE, ""),
            (2, 1, "write", 20 * PAGE, PAGE, ""), (3, 1, "fork", 0, 0, "2"), (4, 2, "exit", 0, 0, "")]
    got = rec.rows_in_range(rows, 2 * PAGE, 10 * PAGE)
    assert got == [(0, 1, "mmap", 2 * PAGE, 8 * PAGE, ""), (1, 1, "write", 8 * PAGE, 2 * PAGE, ""),
                   (3, 1, "fork", 0, 0, "2"), (4, 2, "exit", 0, 0, "")]


def _handmade_rows(region_start: int, nmib: int, child_pages: list[int]) -> list[tuple]:
    """What the recorder writes for: mmap of an unaligned stretch holding an aligned THP region,
    madvise, fill, fork, the child writes ``child_pages`` (page numbers in the region), exits."""
    tr = rec.TraceRows()
    lo, hi = region_start - 5 * PAGE, region_start + nmib * MiB + 3 * PAGE
    maps = rec.replay_pieces(lo, hi, PMD)
    for s, e in maps:
        tr.add(0, 100, "mmap", s, e - s)
    tr.add(1, 100, "madvise", region_start, nmib * MiB, "hugepage")
    tr.writes(2, 100, "write", [(region_start, region_start + nmib * MiB)], maps)
    tr.add(3, 100, "fork", 0, 0, 101)
    runs = rec.page_runs(np.array([region_start + p * PAGE for p in child_pages], dtype=np.uint64))
    tr.writes(4_000_000, 101, "write", runs, maps)
    tr.add(5_000_000, 101, "exit")
    tr.add(6_000_000, 100, "exit")
    return tr.rows


def test_replay_of_a_handmade_trace_counts_cow_and_splits(tmp_path):
    """The replay keeps the region's THP alignment (replay_pieces): every child page written is one
    4 KiB COW copy and every PMD it touches one thp_split_pmd."""
    pages = [1, 2, 3, 700, 1100, 1101, 1500]                    # PMDs 0, 1, 2 of 4 (page 1500: PMD 2)
    path = str(tmp_path / "t.csv")
    write_trace(path, _handmade_rows(0x7F0000000000 + 3 * PMD, 8, pages))
    knobs = {"enabled": "madvise", "defrag": "madvise", "use_zero_page": "1"}
    s = rec.replay(path, knobs=knobs)
    assert s["sim_cow_bytes"] == len(pages) * PAGE
    assert s["thp_split_pmd"] == len({p // 512 for p in pages})


def test_unknown_method_is_refused():
    ok, why = rec.method_supported("soft-dirty")
    assert not ok and "soft-dirty" in why
    with pytest.raises(ValueError, match="method"):
        rec.Recorder("soft-dirty")


@pytest.mark.skipif(ptrace.supported()[0] is False, reason="x86-64 only")
def test_a_syscall_instruction_is_found_in_the_vdso():
    addr = ptrace.find_syscall_insn(os.getpid())
    with open("/proc/self/mem", "rb", buffering=0) as mem:
        mem.seek(addr)
        assert mem.read(2) == b"\x0f\x05"


def test_cli_refuses_bad_input(monkeypatch, capsys, tmp_path):
    from thpcow.cli import main

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["thpcow", "record", *args])
        with pytest.raises(SystemExit) as ei:
            main()
        return ei.value.code, capsys.readouterr().err
    assert run() == (2, "thpcow: give a COMMAND (after --) or --pid PID (one of them)\n")
    assert run("--interval", "0", "--", "true") == (2, "thpcow: --interval=0.0: must be > 0 (ms)\n")
    assert run("--method", "x", "--", "true")[0] == 2
    assert run("-o", str(tmp_path / "t.txt"), "--", "true") == (
        2, f"thpcow: --out={tmp_path / 't.txt'}: expected a .csv or .parquet file\n")
    assert run("--pid", "999999999") == (2, "thpcow: --pid=999999999: no such process\n")
    assert run("--pid", "1", "--", "true")[0] == 2


# -- the real kernel ------------------------------------------------------------------------------------

PROGRAM = r'''
import ctypes, json, mmap, os, random, sys, time
MiB, PMD, PAGE = 1 << 20, 2 << 20, 4096
out, seed, nmib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
size = nmib * MiB
mm = mmap.mmap(-1, size + PMD, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
v = ctypes.c_char.from_buffer(mm); base = ctypes.addressof(v); del v
addr = (base + PMD - 1) & ~(PMD - 1)
off = addr - base
mm.madvise(mmap.MADV_HUGEPAGE, off, size)
mm[off:off + size] = b"\x01" * size
time.sleep(0.05)

def ahp(pid):
    total, cur = 0, False
    for line in open(f"/proc/{pid}/smaps"):
        f = line.split()
        if "-" in f[0] and ":" not in f[0]:
            lo, hi = (int(x, 16) for x in f[0].split("-"))
            cur = lo < addr + size and hi > addr
        elif cur and f[0] == "AnonHugePages:":
            total += int(f[1])
    return total

def pfns(pid):
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(addr // PAGE * 8)
        b = f.read(size // PAGE * 8)
    return [int.from_bytes(b[i:i + 8], "little") & ((1 << 55) - 1) for i in range(0, len(b), 8)]

rng = random.Random(seed)
pages = []
for k in range(size // PMD):
    if rng.random() < 0.25:
        continue                                   # a PMD the child leaves alone
    stride = rng.choice([3, 7, 16, 33, 64])
    pages += [k * 512 + j for j in range(rng.randrange(stride), 512, stride)]
rng.shuffle(pages)
parent = os.getpid()
before = ahp(parent)
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    child_before = ahp(os.getpid())
    for burst in range(3):
        for p in sorted(pages[burst::3]):
            mm[off + p * PAGE] = 2
        time.sleep(0.04)
    mine, theirs = pfns(os.getpid()), pfns(parent)
    res = {"cow_pages": sum(1 for a, b in zip(mine, theirs) if a != b), "written": len(pages),
           "pmds_written": len({p // 512 for p in pages}),
           "child_ahp_before": child_before, "child_ahp_after": ahp(os.getpid())}
    os.write(w, json.dumps(res).encode())
    os._exit(0)
os.close(w)
data = b""
while chunk := os.read(r, 65536):
    data += chunk
os.waitpid(pid, 0)
res = json.loads(data)
res.update(addr=addr, size=size, parent_ahp_before=before, parent_ahp_after=ahp(parent))
with open(out, "w") as f:
    json.dump(res, f)
'''


def _uffd_reason() -> str | None:
    ok, why = rec.method_supported("uffd-wp")
    return None if ok else why


def _pagemap_reason() -> str | None:
    ok, why = rec.method_supported("pagemap")
    return None if ok else why


def _consistent(real) -> bool:
    """The program's own figures agree with each other: every page the child wrote is one COW copy
    (PFNs), every 2 MiB block it touched one split (its AnonHugePages), the parent kept its THPs.
    Another process can break this (compaction moving the parent's pages changes their PFNs)."""
    splits = (real["child_ahp_before"] - real["child_ahp_after"]) // (PMD // 1024)
    return (real["cow_pages"] == real["written"] and splits == real["pmds_written"]
            and real["parent_ahp_after"] == real["parent_ahp_before"])


def _record_program(tmp_path, method: str, seed: int, nmib: int = 16):
    """Record PROGRAM; (its own measurements, the recorded rows, the summary).

    Run again (at most 4 runs) when the program did not get every THP it asked for (memory short
    of free 2 MiB blocks: skipped, saying so, if that lasts) or its own figures disagree
    (:func:`_consistent`: another process moved its pages).  A recorder that changed the run
    would change every run the same way, so it fails here rather than being retried away."""
    prog = tmp_path / "prog.py"
    prog.write_text(PROGRAM)
    got_thp = False
    for attempt in range(4):
        res_path = tmp_path / f"res{attempt}.json"
        with scenario.lab_lock():
            rows, summary = rec.record([sys.executable, str(prog), str(res_path), str(seed), str(nmib)],
                                       method=method, interval_ms=10)
        assert summary.exit_status == 0
        real = json.loads(res_path.read_text())
        if real["parent_ahp_before"] != real["size"] // 1024:
            continue
        got_thp = True
        if _consistent(real):
            return real, rows, summary
    if not got_thp:
        pytest.skip(f"the program got {real['parent_ahp_before']} of {real['size'] // 1024} kB as THPs in "
                    "4 runs (memory short of free 2 MiB blocks)")
    pytest.fail(f"the recorded program's own figures disagreed in every run: {real}")


def _check_against_replay(tmp_path, real, rows):
    """The region's rows replayed on the simulator against the program's own figures."""
    region = rec.rows_in_range(rows, real["addr"], real["addr"] + real["size"])
    path = str(tmp_path / "region.csv")
    write_trace(path, region)
    sim = rec.replay(path)
    real_cow = real["cow_pages"] * PAGE
    real_splits = (real["child_ahp_before"] - real["child_ahp_after"]) // (PMD // 1024)
    assert abs(sim["sim_cow_bytes"] - real_cow) <= 0.05 * real_cow, (sim["sim_cow_bytes"], real_cow)
    assert sim["thp_split_pmd"] == real_splits
    return sim, real_cow, real_splits


@pytest.mark.realkernel
@pytest.mark.parametrize("seed", [1, 2])
def test_recorded_program_replays_with_the_real_cow_and_splits(tmp_path, seed):
    skip_without_real_thp(_uffd_reason)
    real, rows, summary = _record_program(tmp_path, "uffd-wp", seed)
    assert summary.forks == 1 and summary.pids == 2
    ops = [r[2] for r in rows]
    assert ops.count("fork") == 1 and ops.count("exit") == 2
    # the fork and exit events stop the processes: the child's writes lie between its fork row
    # and its exit row, whatever the load on the machine
    child = next(int(r[5]) for r in rows if r[2] == "fork")
    lo, hi = real["addr"], real["addr"] + real["size"]
    where = [i for i, r in enumerate(rows) if r[1] == child and r[2] == "write" and lo <= r[3] < hi]
    fork_row = next(i for i, r in enumerate(rows) if r[2] == "fork")
    exit_row = next(i for i, r in enumerate(rows) if r[1] == child and r[2] == "exit")
    assert where and fork_row < min(where) and max(where) < exit_row
    # exactly the pages the child wrote, nothing else (a page may come in the rows of two
    # intervals when a scan meets its store: one CI run saw 479 page-rows for 478 pages)
    pages = set()
    for r in rows:
        if r[1] == child and r[2] == "write" and lo <= r[3] < hi:
            pages.update(range(r[3] // PAGE, (r[3] + r[4]) // PAGE))
    assert len(pages) == real["written"]
    _check_against_replay(tmp_path, real, rows)


@pytest.mark.realkernel
def test_pagemap_method_replays_with_the_real_cow_and_splits(tmp_path):
    skip_without_real_thp(_pagemap_reason)
    real, rows, _ = _record_program(tmp_path, "pagemap", seed=3)
    _check_against_replay(tmp_path, real, rows)


@pytest.mark.realkernel
def test_recording_a_pid_leaves_it_running_untraced_and_unregistered(tmp_path):
    skip_without_real_thp(_uffd_reason)
    target = subprocess.Popen([sys.executable, "-c",
                               "import time\nb = bytearray(1 << 20)\nwhile True:\n"
                               "    b[::4096] = b'x' * 256\n    time.sleep(0.01)"])
    try:
        time.sleep(0.3)
        out = str(tmp_path / "pid.parquet")
        rows, summary = rec.record(pid=target.pid, out=out, method="uffd-wp", interval_ms=10, duration_s=0.4)
        assert target.poll() is None
        status = open(f"/proc/{target.pid}/status").read()
        assert "TracerPid:\t0\n" in status
        assert not any("uw" in v.vm_flags for v in procfs.read_smaps(target.pid))
        df = read_trace(out)
        assert (df["op"] == "write").sum() > 0 and summary.pids == 1
        # the 1 MiB buffer it keeps rewriting is written in the recording, page by page
        assert summary.written_bytes >= 1 << 20
    finally:
        target.kill()
        target.wait()
