"""`thpcow compare --on sim,real`: a scenario's op stream replayed on the running kernel (lab/realrun.py).

The executor's own tests (agents, messages, COW from pagemap on 4 KiB pages, cleanup, the table and
its notes) need Linux but no THP.  The tests marked realkernel compare the simulator with this
kernel on the built-in scenario and on copy-after-fork at a small size: equal thp_split_pmd and
thp_fault_alloc, COW bytes within 10 %.  /proc/vmstat is system-wide: run_real() keeps the quietest
of several runs, and a test skips, saying so, when no two runs were equally quiet.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from thpcow.experiments.runner import run_point
from thpcow.experiments.scenario import resolve_scenario
from thpcow.lab import realrun
from thpcow.lab.realrun import RealResult, RealRunError

from conftest import skip_unless_settled, skip_without_real_thp

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="agents are Linux processes")
root_only = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                               reason="pagemap PFNs need root (CAP_SYS_ADMIN)")

MiB = 1 << 20


def small_copy(thp: bool, writer: str = "child", size_mib: int = 16, copy_mib: int = 8) -> dict:
    return {"name": f"copy-small-{'thp' if thp else '4k'}", "ram_mib": 256, "seed": 3, "tlb_model": False,
            "sysfs": {"enabled": "madvise", "defrag": "madvise"},
            "workload": {"name": "copy-after-fork", "size_mib": size_mib, "copy_mib": copy_mib,
                         "range_kib": 2048, "writer": writer, "thp": thp},
            "policies": ["upstream"]}


def alive_agents(pids) -> list[int]:
    return [p for p in pids if realrun.is_agent(p)]


# -- the CLI's --on ----------------------------------------------------------------------------------
def test_parse_on():
    from thpcow.cli.compare import parse_on

    assert parse_on("sim") == ("sim",)
    assert parse_on("sim,real") == ("sim", "real")
    assert parse_on(" real , sim ") == ("real", "sim")
    with pytest.raises(ValueError, match=r"--on=foo: expected sim or sim,real"):
        parse_on("foo")
    with pytest.raises(ValueError, match=r"--on=real: .*use --on sim,real"):
        parse_on("real")


@pytest.mark.parametrize("on, line", [
    ("foo", "thpcow: --on=foo: expected sim or sim,real (comma-separated: sim, real)"),
    ("sim,bar", "thpcow: --on=sim,bar: expected sim or sim,real (comma-separated: sim, real)"),
])
def test_bad_on_exits_2_with_one_line(monkeypatch, capsys, tmp_path, on, line):
    from thpcow.cli import main

    monkeypatch.setattr(sys, "argv", ["thpcow", "compare", "--on", on, "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as ei:
        main()
    out, err = capsys.readouterr()
    assert ei.value.code == 2
    assert err.strip().splitlines() == [line]
    assert "Traceback" not in err and out == ""


# -- policies, memory, cgroup ------------------------------------------------------------------------
def test_real_support():
    assert realrun.real_support("upstream") == ""
    assert realrun.real_support("6.18") == ""
    assert realrun.real_support("collapse-after-fork:who=parent") == ""
    assert realrun.real_support("dontfork") == ""
    for spec in ("thp-cow-v1", "pre-5.8", "mthp-cow:order=4", "directed-khugepaged", "cow-density:threshold=64"):
        assert realrun.real_support(spec) == realrun.NEEDS_KERNEL_CHANGE
    with pytest.raises(RealRunError, match="thp-cow-v1: needs a kernel change"):
        realrun.run_real(resolve_scenario(small_copy(True)), "thp-cow-v1")


def test_check_memory(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "meminfo").write_text("MemTotal: 2048000 kB\nMemAvailable:  524288 kB\n")
    assert realrun.mem_available(str(tmp_path)) == 512 * MiB
    realrun.check_memory(128 * MiB, "x", str(tmp_path))
    with pytest.raises(RealRunError) as ei:
        realrun.check_memory(300 * MiB, "mmap of 300 MiB", str(tmp_path))
    msg = str(ei.value)
    assert "\n" not in msg and "mmap of 300 MiB needs 300 MiB" in msg and "MemAvailable is 512 MiB" in msg


def test_cgroup_detection(tmp_path):
    (tmp_path / "proc" / "self").mkdir(parents=True)
    info = tmp_path / "proc" / "self" / "mountinfo"
    info.write_text("30 25 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n")
    assert realrun.cgroup2_root(str(tmp_path)) is None            # v1 only: no THP events per cgroup
    cg = tmp_path / "sys" / "fs" / "cgroup" / "unified"
    cg.mkdir(parents=True)
    (cg / "cgroup.controllers").write_text("hugetlb\n")
    info.write_text("31 25 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n")
    assert realrun.cgroup2_root(str(tmp_path)) is None            # v2 without the memory controller
    (cg / "cgroup.controllers").write_text("cpu memory pids\n")
    assert realrun.cgroup2_root(str(tmp_path)) == str(cg)
    stat = realrun.parse_memory_stat("anon 4096\nthp_fault_alloc 3\nthp_collapse_alloc 1\npgfault 77\n")
    assert stat == {"anon": 4096, "thp_fault_alloc": 3, "thp_collapse_alloc": 1, "pgfault": 77}


# -- the agents ---------------------------------------------------------------------------------------
@linux_only
def test_agent_ops_and_fork():
    a = realrun.start_agent()
    pids = [a.pid]
    try:
        _w, _f, addr = a.call("mmap", 4 * MiB)
        assert addr % (2 * MiB) == 0
        offs = np.arange(0, 4 * MiB, 4096, dtype=np.int64)
        _w, flt, _ = a.call("write", addr, offs, 7)
        assert flt >= len(offs)                      # one first-touch fault per page at least
        _w, _f, total = a.call("read", addr, offs)
        assert total == 7 * len(offs)
        _w, _f, err = a.call("madvise", addr + 1, 4096, 4)       # unaligned: EINVAL, reported as a value
        assert err == 22
        import socket
        ours, theirs = socket.socketpair()
        try:
            _w, _f, child = a.call("fork", fds=(theirs.fileno(),))
        finally:
            theirs.close()
        c = realrun._AgentHandle(child, ours, None)
        pids.append(child)
        assert child != a.pid and realrun.is_agent(child)
        _w, flt, _ = c.call("write", addr, offs[:10], 9)
        assert flt >= 10                             # COW faults in the child
        _w, _f, t_child = c.call("read", addr, offs[:10])
        _w, _f, t_parent = a.call("read", addr, offs[:10])
        assert (t_child, t_parent) == (90, 70)       # the parent kept its pages
        with pytest.raises(RealRunError, match="no region"):
            c.call("write", addr + 64 * MiB, offs[:1], 1)
        c.call("exit")
        assert realrun.wait_gone(child)
        a.call("exit")
        a.popen.wait(timeout=10)
    finally:
        for p in pids:
            if realrun.is_agent(p):
                os.kill(p, 9)
    assert alive_agents(pids) == []


@linux_only
@root_only
@pytest.mark.parametrize("writer", ["child", "parent"])
def test_cow_bytes_4k_pages_match_the_simulator(writer):
    """Without THP every rewritten page is one 4 KiB COW copy: pagemap PFN changes count them."""
    from thpcow.lab import procfs
    from thpcow.lab.scenario import lab_lock

    if procfs.read_thp_knobs().get("enabled") == "always":
        pytest.skip("THP enabled=always: the region would get THPs without MADV_HUGEPAGE")
    sc = resolve_scenario(small_copy(False, writer, size_mib=8, copy_mib=4))
    with lab_lock():
        once = realrun._Once(sc, "upstream", None)
        once.run()
    assert once.cow_pages * 4096 == 4 * MiB
    assert alive_agents(once.all_pids) == []
    sim = run_point(sc, "upstream").summary
    assert sim["cow_mib"] == 4.0


@linux_only
def test_dead_agent_is_an_error_and_nothing_is_left(monkeypatch):
    """An agent killed mid-run: one-line RealRunError, and no agent survives."""
    sc = resolve_scenario(small_copy(False, size_mib=8, copy_mib=4))
    once = realrun._Once(sc, "upstream", None)
    seen = []

    def progress(t, total):
        if once.agents and not seen and len(once.agents) == 2:
            seen.append(once.agents[1].pid)
            os.kill(once.agents[1].pid, 9)
    with pytest.raises(RealRunError) as ei:
        once.run(progress)
    assert "\n" not in str(ei.value) and "went away" in str(ei.value)
    assert seen and alive_agents(once.all_pids) == []


# -- the table and its notes ---------------------------------------------------------------------------
def _fake_real(**over) -> RealResult:
    s = {"cow_mib": 65.0, "thp_split_pmd": 128, "thp_fault_alloc": 0, "thp_collapse_alloc": 0,
         "thp_deferred_split_page": 128, "pgfault": 100, "pgreuse": 0, "thp_fault_alloc_run": 128,
         "thp_split_pmd_run": 128, "peak_anon_huge_mib": 298.0, "lat_p50_us": 80.0, "lat_p99_us": 200.0,
         "op_ms": 120.0, "wall_s": 1.0}
    s.update(over)
    return RealResult("upstream", s, scores=[(256, 1), (256, 1)], settled=True)


def test_side_by_side_and_notes():
    sc = resolve_scenario(small_copy(True))
    sim = dict(_fake_real().summary, model_ms=60.0, lat_p50_us=40.0)
    real = _fake_real()
    rows = realrun.side_by_side(sim, real)
    by = {r[0]: r[1:] for r in rows}
    assert by["COW MiB"] == ["65.0", "65.0", "1.00"]
    assert by["write p50 µs"] == ["40.0", "80.0", "0.50"]
    assert by["op time ms"] == ["60.0", "120.0", "0.50"]
    assert realrun.explain(sim, real, sc) == []               # equal counters: nothing to explain
    real = _fake_real(thp_collapse_alloc=3, pgfault=400, cow_mib=70.0)
    notes = realrun.explain(sim, real, sc)
    assert any(n.startswith("thp_collapse_alloc: khugepaged collapsed 0 PMDs in the simulator, 3 here") for n in notes)
    assert any(n.startswith("pgfault: real +300") for n in notes)
    assert any(n.startswith("COW MiB: sim 65.0, real 70.0") for n in notes)
    real = _fake_real(thp_split_pmd=130)
    notes = realrun.explain(sim, real, sc)
    assert len(notes) == 1 and "thp_split_pmd: real +2" in notes[0]
    noisy = RealResult("upstream", real.summary, scores=[(260, 1), (258, 1)], settled=False)
    assert "noisy" in realrun.explain(sim, noisy, sc)[0]
    rows = realrun.side_by_side(sim, None, realrun.NEEDS_KERNEL_CHANGE)
    assert all(r[2] == realrun.NEEDS_KERNEL_CHANGE for r in rows)


# -- on the running kernel --------------------------------------------------------------------------
def _compare(sc, policy: str = "upstream", whole: bool = False):
    real = realrun.run_real(sc, policy, runs=2, max_runs=5)
    assert alive_agents(real.agent_pids) == []
    skip_unless_settled(real.settled, real.scores, f"{sc.name} on the real kernel")
    res = run_point(sc, policy)
    import pandas as pd
    sim = realrun.sim_extras(res.summary, pd.DataFrame(res.ops), pd.DataFrame(res.samples))
    return (sim, real.summary, res, real) if whole else (sim, real.summary)


@pytest.mark.realkernel
@root_only
def test_default_scenario_sim_equals_real():
    skip_without_real_thp()
    sc = resolve_scenario(None)
    from dataclasses import replace
    sc = replace(sc, tlb_model=False)
    sim, real = _compare(sc)
    for c in ("thp_split_pmd", "thp_fault_alloc"):
        assert real[c] == sim[c], c
    assert real["thp_fault_alloc_run"] == sc.make_workload().dataset_mib // 2
    assert abs(real["cow_mib"] - sim["cow_mib"]) <= 0.10 * sim["cow_mib"]


@pytest.mark.realkernel
@root_only
@pytest.mark.parametrize("writer", ["child", "parent"])
def test_copy_after_fork_small_sim_equals_real(writer):
    skip_without_real_thp()
    sc = resolve_scenario(small_copy(True, writer))
    sim, real, res, real_res = _compare(sc, whole=True)
    for c in ("thp_split_pmd", "thp_fault_alloc"):
        assert real[c] == sim[c], c
    assert real["thp_split_pmd"] > 0
    assert abs(real["cow_mib"] - sim["cow_mib"]) <= 0.10 * sim["cow_mib"]
    assert real["peak_anon_huge_mib"] == sim["peak_anon_huge_mib"]     # both processes, same sample times
    # the workload's own pages, not the agents' interpreters (~26 MiB each)
    from thpcow.experiments import endtoend
    peak_sim = endtoend._sim_figures(res)["peak_anon_mib"]
    peak_real = endtoend._real_figures(real_res)["peak_anon_mib"]
    assert abs(peak_real - peak_sim) <= 0.05 * peak_sim, (peak_sim, peak_real)


@pytest.mark.realkernel
@root_only
def test_cli_on_sim_real_prints_both(monkeypatch, capsys, tmp_path):
    skip_without_real_thp()
    import json
    import yaml

    from thpcow.cli import main

    path = tmp_path / "s.yaml"
    d = small_copy(True)
    d["policies"] = ["upstream", "thp-cow-v1"]
    path.write_text(yaml.safe_dump(d))
    monkeypatch.setattr(sys, "argv", ["thpcow", "compare", str(path), "--on", "sim,real", "--json",
                                      "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as ei:
        main()
    out, _err = capsys.readouterr()
    assert ei.value.code in (0, None)
    doc = json.loads(out)
    real = {r["policy"]: r for r in doc["real"]}
    assert real["thp-cow-v1"]["status"] == realrun.NEEDS_KERNEL_CHANGE
    up = real["upstream"]
    assert up["status"] == "ran" and up["real"]["cow_mib"] > 0 and up["sim"]["cow_mib"] > 0
    assert up["agent_pids"] and alive_agents(up["agent_pids"]) == []


RUNNER = r"""
import os, signal, sys, time
# a test runner's worker may ignore SIGINT, and a child inherits that: take Python's handler back
signal.signal(signal.SIGINT, signal.default_int_handler)
from thpcow.experiments.scenario import resolve_scenario
from thpcow.lab import realrun
sc = resolve_scenario({"name": "hold", "ram_mib": 256, "tlb_model": False,
                       "workload": {"name": "copy-after-fork", "size_mib": 8, "copy_mib": 4,
                                    "range_kib": 2048, "thp": False}, "policies": ["upstream"]})
once = realrun._Once(sc, "upstream", None)
def progress(t, total):
    if len(once.agents) == 2:
        print(" ".join(str(a.pid) for a in once.agents.values()), flush=True)
        time.sleep(60)
once.run(progress)
"""


@linux_only
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGINT"])
def test_no_agent_survives_the_runner(tmp_path, sig):
    """The runner killed (SIGKILL: the first agent dies with it, its fork exits at EOF) or
    interrupted (SIGINT: the runner ends its agents) mid-run, with a parent and a child agent."""
    import signal
    import subprocess
    import time

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (realrun._package_path(),
                                                                    os.environ.get("PYTHONPATH")))))
    proc = subprocess.Popen([sys.executable, "-c", RUNNER], stdout=subprocess.PIPE, env=env, text=True)
    try:
        line = proc.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2 and all(realrun.is_agent(p) for p in pids)
        proc.send_signal(getattr(signal, sig))
        # the runner's own cleanup is bounded (5 s per agent's exit reply, 10 s for a process to
        # go, 2 s per pid to be reaped): under a loaded machine it may take most of that
        proc.wait(timeout=45)
        deadline = time.monotonic() + 10
        while alive_agents(pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert alive_agents(pids) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@linux_only
def test_lock_busy(tmp_path, monkeypatch):
    """lock_busy() sees a lock another open file description holds (as another process's would)."""
    import fcntl

    from thpcow.lab import scenario

    path = tmp_path / "lab.lock"
    monkeypatch.setattr(scenario, "LOCK_PATH", str(path))
    assert realrun.lock_busy() is False
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert realrun.lock_busy() is True
    finally:
        os.close(fd)
    assert realrun.lock_busy() is False


@linux_only
def test_short_memory_is_one_line_and_leaves_nothing(monkeypatch):
    """MemAvailable below what the workload maps: one-line RealRunError before the mmap."""
    sc = resolve_scenario(small_copy(False, size_mib=128, copy_mib=4))
    monkeypatch.setattr(realrun, "mem_available", lambda root="/": realrun.MEM_MARGIN + 100 * MiB)
    once = realrun._Once(sc, "upstream", None)
    with pytest.raises(RealRunError) as ei:
        once.run()
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith("not enough free memory for the real run: mmap of 128 MiB needs 128 MiB")
    assert "MemAvailable is 356 MiB" in msg
    assert alive_agents(once.all_pids) == []


def test_real_paced_needs_real(monkeypatch, capsys, tmp_path):
    from thpcow.cli import main

    monkeypatch.setattr(sys, "argv", ["thpcow", "compare", "--real-paced", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as ei:
        main()
    _out, err = capsys.readouterr()
    assert ei.value.code == 2
    assert err.strip().splitlines() == ["thpcow: --real-paced: needs --on sim,real"]


@linux_only
def test_paced_run_lasts_as_long_as_the_stream():
    """--real-paced: each op waits for its time; the fast default does not."""
    import time

    d = small_copy(False, size_mib=8, copy_mib=4)
    d["workload"].update(fork_after_ms=1000, hold_ms=1000)
    sc = resolve_scenario(d)
    dur = sc.make_workload().duration_ns() / 1e9
    assert dur >= 2.0
    walls = {}
    for paced in (False, True):
        once = realrun._Once(sc, "upstream", None, paced)
        t0 = time.perf_counter()
        once.run()
        walls[paced] = time.perf_counter() - t0
        assert alive_agents(once.all_pids) == []
    assert walls[True] >= dur
    assert walls[False] < dur             # an agent's start and a few ms of ops, not 2 s
