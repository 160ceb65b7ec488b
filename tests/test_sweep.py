"""Sweeps: grid files, one Parquet file per finished point, resuming a killed sweep, Dask."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest

from thpcow.experiments.runner import run_point
from thpcow.experiments.scenario import ScenarioError
from thpcow.experiments.sweep import load_grid, run_sweep, stored_ids

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")

GRID = """\
name: resume
scenario:
  ram_mib: 256
  sysfs: {enabled: madvise}
  workload: {name: redis-bgsave, dataset_mib: 8, writes_per_s: 50000, scan_mib_s: 128, tail_ms: 10}
policies: [upstream, thp-cow-v1]
grid:
  workload.dataset_mib: [8, 12, 16]
  seed: [0, 1]
"""


def write(tmp_path, text: str, name: str = "grid.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def log_lines(out: str, pid: str) -> list[str]:
    with open(os.path.join(out, "runlog", f"{pid}.log")) as fh:
        return fh.read().splitlines()


# -- grid files ------------------------------------------------------------------------------------
def test_grid_points_are_the_product_times_policies(tmp_path):
    g = load_grid(write(tmp_path, GRID))
    assert len(g.points) == 12 and g.axes == ["workload.dataset_mib", "seed"]
    assert [(p.values["workload.dataset_mib"], p.values["seed"], p.policy) for p in g.points[:3]] == [
        (8, 0, "upstream"), (8, 0, "thp-cow-v1"), (8, 1, "upstream")]
    assert g.points[2].scenario.seed == 1 and g.points[2].scenario.params["dataset_mib"] == 8
    assert g.points[2].scenario.params["tail_ms"] == 10.0
    assert len({p.id for p in g.points}) == 12
    assert [p.id for p in load_grid(write(tmp_path, GRID, "again.yaml")).points] == [p.id for p in g.points]


@pytest.mark.parametrize("text, expected", [
    ("grids: {}\n", "grid.yaml:1: grids: unknown field; known: name, scenario, policies, grid"),
    ("grid:\n  ram: [1]\n", "grid.yaml:2: grid.ram: not a scenario field to vary"),
    ("grid:\n  workload: [1]\n", "grid.yaml:2: grid.workload: name the workload key to vary"),
    ("grid:\n  seed: 3\n", "grid.yaml:2: grid.seed: expected a non-empty list of values"),
    ("grid:\n  workload.dataset_mib:\n    - 64\n    - -1\n",
     "grid.yaml:4: workload.dataset_mib: workload redis-bgsave: parameter dataset_mib=-1: must be >= 1"),
    ("grid:\n  workload.datasets: [1]\n", "grid.yaml:2: workload.datasets: not a parameter of redis-bgsave"),
    ("grid:\n  sysfs.enabled: [always, often]\n", "grid.yaml:2: sysfs.enabled: write enabled: EINVAL"),
    ("policies: [upstream, thp-cow-v0]\n", "grid.yaml:1: policies[1]: unknown COW policy 'thp-cow-v0'"),
    ("scenario: nowhere.yaml\n", "grid.yaml:1: scenario: no such scenario file"),
    ("grid:\n  seed: [1, 1]\n", "run the same scenario and policy"),
])
def test_grid_errors_name_line_and_field(tmp_path, text, expected):
    with pytest.raises(ScenarioError) as exc:
        load_grid(write(tmp_path, text))
    assert expected in str(exc.value)


def test_grid_on_a_scenario_file(tmp_path):
    write(tmp_path, "ram_mib: 300\nworkload: {name: forkserver, data_mib: 8, hot_mib: 1}\n", "base.yaml")
    g = load_grid(write(tmp_path, "scenario: base.yaml\ngrid:\n  sysfs.khugepaged/max_ptes_shared: [0, 256]\n"))
    assert [p.scenario.sysfs for p in g.points] == [{"khugepaged/max_ptes_shared": "0"},
                                                    {"khugepaged/max_ptes_shared": "256"}]
    assert g.points[0].scenario.ram_mib == 300 and g.name == "grid"


# -- killed and resumed ------------------------------------------------------------------------------
def test_a_killed_sweep_resumes_without_losing_or_repeating_points(tmp_path):
    grid = write(tmp_path, GRID)
    out = str(tmp_path / "out")
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "thpcow.cli", "sweep", grid, "--out", out, "--workers", "2"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(stored_ids(out)) < 4 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)          # the sweep, its process pool, everything it started
        proc.wait()
    g = load_grid(grid)
    first = stored_ids(out)
    assert 4 <= len(first) < len(g.points)
    assert len(pd.read_parquet(os.path.join(out, "points"))) == len(first)   # every stored file is whole

    seen = []
    df = run_sweep(grid, out, workers=1, progress=lambda done, total, p: seen.append((done, total)))
    assert seen[0] == (len(first), 12) and seen[-1] == (12, 12) and len(seen) == 12 - len(first) + 1
    assert len(df) == 12 and list(df["point"]) == [p.id for p in g.points]
    assert os.path.exists(os.path.join(out, "summary.png"))
    sessions = []
    for p in g.points:
        lines = log_lines(out, p.id)
        for line in lines:
            s = line.split("session=")[1].split()[0]
            if s not in sessions:
                sessions.append(s)
        assert sum(line.endswith(" stored") for line in lines) == 1, (p.id, lines)
    assert len(sessions) == 2
    for p in g.points:
        second = [line for line in log_lines(out, p.id) if f"session={sessions[1]}" in line]
        if p.id in first:
            assert second == []                       # stored before the kill: not run again
        else:
            assert [line.split()[2] for line in second] == ["run", "stored"]
    row = df.iloc[7]
    assert row["cow_mib"] == run_point(g.points[7].scenario, g.points[7].policy).summary["cow_mib"]
    assert run_sweep(grid, out, workers=1).equals(df)      # nothing left to do


def test_a_failing_point_is_reported_and_retried(tmp_path):
    good = "time_ns,pid,op,address,length,arg\n0,1,mmap,0x40000000,4194304,\n0,1,write,0x40000000,4194304,\n" \
           "10,1,fork,0,0,2\n20,2,write,0x40000000,100,\n"
    (tmp_path / "a.csv").write_text(good)
    (tmp_path / "b.csv").write_text(good.replace("20,2,write", "20,2,scribble"))
    grid = write(tmp_path, """\
        scenario:
          ram_mib: 64
          workload: {name: trace, path: a.csv}
        grid:
          workload.path: [a.csv, b.csv]
        """)
    out = str(tmp_path / "out")
    with pytest.raises(RuntimeError, match=r"1 point\(s\) failed .*row 4: op='scribble'"):
        run_sweep(grid, out, workers=1)
    g = load_grid(grid)
    assert stored_ids(out) == {g.points[0].id}
    assert log_lines(out, g.points[1].id)[-1].split()[2] == "failed"
    (tmp_path / "b.csv").write_text(good)
    df = run_sweep(grid, out, workers=1)
    assert len(df) == 2 and len(log_lines(out, g.points[0].id)) == 2      # a.csv ran once
    assert df["workload.path"].tolist() == ["a.csv", "b.csv"]            # the grid values as written


def test_sweep_on_a_dask_local_cluster(tmp_path):
    pytest.importorskip("distributed")
    grid = write(tmp_path, GRID.replace("[8, 12, 16]", "[8]").replace("[0, 1]", "[0]"))
    out = str(tmp_path / "out")
    df = run_sweep(grid, out, scheduler="local", workers=1)
    assert list(df["policy"]) == ["upstream", "thp-cow-v1"], f"policies: {list(df['policy'])}"
    assert len(stored_ids(out)) == 2, f"stored: {sorted(stored_ids(out))}"
    local = run_sweep(grid, str(tmp_path / "local"), workers=1)
    differ = [c for c in df.columns if not df[c].equals(local[c])]
    pd.testing.assert_frame_equal(df, local, obj=f"dask vs local (columns not equal: {differ})")


def test_a_sweep_over_the_series_knob(tmp_path):
    """sysfs.thp_cow as a grid axis: always copies whole THPs on COW (no split), never splits."""
    grid = GRID.replace("policies: [upstream, thp-cow-v1]", "policies: [upstream]").replace(
        "  workload.dataset_mib: [8, 12, 16]\n  seed: [0, 1]\n", "  sysfs.thp_cow: [never, always]\n")
    df = run_sweep(write(tmp_path, grid), str(tmp_path / "out"), workers=1, plot=False)
    by = df.set_index("sysfs.thp_cow")
    assert by.loc["never", "thp_split_pmd"] > 0 and by.loc["never", "sim_huge_cow"] == 0
    assert by.loc["always", "thp_split_pmd"] == 0 and by.loc["always", "sim_huge_cow"] > 0


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc/<pid>/task/*/children)."""
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as fh:
                    kids = [int(x) for x in fh.read().split()]
            except OSError:
                continue
            for k in kids:
                if k not in out:
                    out.add(k)
                    todo.append(k)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")
def test_a_sweep_killed_with_sigkill_leaves_no_worker_behind(tmp_path):
    grid = write(tmp_path, GRID)
    out = str(tmp_path / "out")
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "thpcow.cli", "sweep", grid, "--out", out, "--workers", "2"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        kids: set[int] = set()
        while (len(kids) < 3 or not stored_ids(out)) and proc.poll() is None and time.monotonic() < deadline:
            kids |= _descendants(proc.pid)               # the forkserver and the two workers
            time.sleep(0.02)
        assert proc.poll() is None and len(kids) >= 3, kids
        os.kill(proc.pid, signal.SIGKILL)                 # the sweep alone, not its process group
        proc.wait()
        deadline = time.monotonic() + 15
        while any(_alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [k for k in kids if _alive(k)], "workers outlived the sweep"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
