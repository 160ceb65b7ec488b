"""Scenarios, the compare runner, its report files and the `thpcow compare` command."""

from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import pandas as pd
import pytest

import thpcow
from thpcow.experiments import report
from thpcow.experiments.costs import latency_model
from thpcow.experiments.runner import COUNTERS, SUMMARY_SCHEMA, compare, run_compare, run_point, thp_kb
from thpcow.experiments.scenario import ScenarioError, default_scenario, load_scenario, parse_scenario
from thpcow.kernel import MADV_HUGEPAGE, PAGE_SIZE, Kernel
from thpcow.experiments.policies import parse_policy
from thpcow.strategies import parse_strategy

MIB = 1 << 20

TINY = """\
name: tiny
ram_mib: 256
seed: 5
sysfs:
  enabled: madvise
workload:
  name: copy-after-fork
  size_mib: 16
  copy_mib: 8
  range_kib: 1024
  order: sequential
  fork_after_ms: 2
  hold_ms: 1
policies: [upstream, thp-cow-v1]
"""


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return str(path)


# -- scenario schema errors --------------------------------------------------------------------
def bad(text: str) -> str:
    with pytest.raises(ScenarioError) as exc:
        parse_scenario(textwrap.dedent(text), "s.yaml")
    return str(exc.value)


@pytest.mark.parametrize("text, expected", [
    ("ram: 1024\nworkload: {name: forkserver}\n", "s.yaml:1: ram: unknown field; known: name,"),
    ("name: x\nram_mib: lots\nworkload: {name: forkserver}\n", "s.yaml:2: ram_mib: expected an integer, got 'lots'"),
    ("ram_mib: 8\nworkload: {name: forkserver}\n", "s.yaml:1: ram_mib: 8 must be >= 16"),
    ("fragmentation: 1.5\nworkload: {name: forkserver}\n", "s.yaml:1: fragmentation: 1.5 must be <= 1.0"),
    ("check: maybe\nworkload: {name: forkserver}\n", "s.yaml:1: check: expected a boolean (true/false), got 'maybe'"),
    ("tlb_model: off-ish\nworkload: {name: forkserver}\n",
     "s.yaml:1: tlb_model: expected a boolean (true/false), got 'off-ish'"),
    ("seed: [1]\nworkload: {name: forkserver}\n", "s.yaml:1: seed: expected a int, got a list"),
    ("name: x\n", "s.yaml:1: workload: missing"),
    ("workload:\n  name: memcached\n", "s.yaml:2: workload.name: unknown workload 'memcached'; known: redis-bgsave"),
    ("workload:\n  size_mib: 4\n", "s.yaml:2: workload.name: missing; one of redis-bgsave"),
    ("workload:\n  name: forkserver\n  children: many\n",
     "s.yaml:3: workload.children: workload forkserver: parameter children='many': expected an integer"),
    ("workload:\n  name: forkserver\n  kids: 3\n", "s.yaml:3: workload.kids: not a parameter of forkserver; known:"),
    ("workload:\n  name: forkserver\n  data_mib: 4\n  hot_mib: 8\n",
     "s.yaml:4: workload.hot_mib: workload forkserver: parameter hot_mib=8.0 exceeds data_mib=4"),
    ("workload: {name: forkserver}\npolicies:\n  - upstream\n  - thp-cow-v9\n",
     "s.yaml:4: policies[1]: unknown COW policy 'thp-cow-v9'; known:"),
    ("workload: {name: forkserver}\npolicies:\n  - mthp-cow:order=12\n",
     "s.yaml:3: policies[0]: build mthp-cow: order=12 must be within 2..9"),
    ("workload: {name: forkserver}\npolicies:\n  - cow-density:limit=3\n",
     "s.yaml:3: policies[0]: build cow-density: unknown parameter(s) limit"),
    ("workload: {name: forkserver}\npolicies: []\n", "s.yaml:2: policies: expected a non-empty list"),
    ("workload: {name: forkserver}\npolicies: [upstream, upstream]\n", "policies[1]: 'upstream' is listed twice"),
    ("workload: {name: forkserver}\nsysfs:\n  enabled: sometimes\n", "s.yaml:3: sysfs.enabled: write enabled: EINVAL"),
    ("workload: {name: forkserver}\nsysfs:\n  khugepaged/max_ptes_none: 600\n",
     "s.yaml:3: sysfs.khugepaged/max_ptes_none: write khugepaged/max_ptes_none: EINVAL"),
    ("workload: {name: forkserver}\nsysfs:\n  hpage_pmd_size: 4096\n", "s.yaml:3: sysfs.hpage_pmd_size: "),
    ("workload: {name: forkserver}\nmachine: vax-780\n", "s.yaml:2: machine: unknown preset 'vax-780'; known:"),
    ("seed: 1\nseed: 2\nworkload: {name: forkserver}\n", "s.yaml:2: seed: given twice (first on line 1)"),
    ("workload: {name: forkserver\n", "s.yaml:2: not valid YAML"),
    ("", "s.yaml:1: the file is empty"),
    ("- a\n- b\n", "s.yaml:1: document: expected a mapping"),
])
def test_scenario_errors_name_line_and_field(text, expected):
    assert expected in bad(text)


def test_trace_path_is_relative_to_the_scenario(tmp_path):
    (tmp_path / "traces").mkdir()
    (tmp_path / "traces" / "t.csv").write_text("time_ns,pid,op,address,length\n0,1,mmap,4096,8192\n")
    (tmp_path / "s.yaml").write_text("workload:\n  name: trace\n  path: traces/t.csv\n")
    sc = load_scenario(str(tmp_path / "s.yaml"))
    assert sc.params["path"] == str(tmp_path / "traces" / "t.csv") and sc.name == "s"
    (tmp_path / "b.yaml").write_text("workload:\n  name: trace\n  path: traces/none.csv\n")
    with pytest.raises(ScenarioError, match=r"b.yaml:3: workload.path: .*no such file"):
        load_scenario(str(tmp_path / "b.yaml"))


def test_default_scenario_is_valid_and_round_trips():
    sc = default_scenario()
    assert sc.workload == "redis-bgsave" and len(sc.policies) >= 3 and "upstream" in sc.policies
    again = parse_scenario(sc.to_yaml(), "again.yaml")
    assert again.to_dict() == sc.to_dict()


# -- the runner against the kernel's own counters -----------------------------------------------
def replay_tiny(policy: str) -> dict:
    """The tiny scenario done by hand on a kernel: the figures compare() must report."""
    pol = parse_policy(policy)
    k = Kernel(ram=256 * MIB, seed=5, build=pol.build)
    k.sysfs.write("enabled", "madvise")
    used = lambda: (k.mem.nr_frames - k.mem.nr_free) * PAGE_SIZE  # noqa: E731
    p = k.spawn()
    a = p.mmap(16 * MIB)
    p.madvise(a, 16 * MIB, MADV_HUGEPAGE)
    p.write(a, 16 * MIB, 1)
    peak = used()
    k.run_until(2_000_000)
    before, base_mem = k.vmstat_snapshot(), used()
    if pol.strategy:
        pol.strategy.before_fork(p, [(a + i * MIB, MIB) for i in range(8)])
    c = p.fork()
    lat = []
    model = latency_model()
    per = int(round(MIB / (4096 * MIB) * 1e9))      # range / copy_mib_s
    for i in range(8):
        k.run_until(2_000_000 + i * per)
        b = k.vmstat_snapshot()
        c.write_many(a + i * MIB + np.arange(256) * PAGE_SIZE, 2 + i)
        d = {name: k.vmstat_snapshot()[name] - b[name] for name in COUNTERS}
        lat.append(model.op_cost_ns("write", d, accesses=256, nbytes=MIB, dense=True) / 1000)
        peak = max(peak, used())
    k.run_until(2_000_000 + 8 * per)
    if pol.strategy:
        pol.strategy.phase_end(p, [c])
    huge_end = p.smaps_fields()
    k.run_until(2_000_000 + 8 * per + 1_000_000)
    c.exit()
    after = k.vmstat_snapshot()
    f = p.smaps_fields()
    return {"d": {n: after[n] - before[n] for n in COUNTERS}, "peak_mib": peak / MIB,
            "peak_extra_mib": (peak - base_mem) / MIB, "lat": lat, "thp_end": f["AnonHugePages"] / f["Anonymous"],
            "sim_ms": k.now / 1e6, "huge_before_exit": huge_end}


@pytest.mark.parametrize("policy", ["upstream", "thp-cow-v1"])
def test_compare_numbers_are_the_kernels_counters(tiny, policy):
    row = run_point(tiny, policy).summary
    want = replay_tiny(policy)
    for name in COUNTERS:
        assert row[name] == want["d"][name], name
    assert row["cow_mib"] == (want["d"]["sim_cow_bytes"] + want["d"]["sim_collapse_bytes"]) / MIB == 8.0
    assert row["peak_mib"] == want["peak_mib"] and row["peak_extra_mib"] == want["peak_extra_mib"]
    assert row["lat_p50_us"] == pytest.approx(np.percentile(want["lat"], 50))
    assert row["lat_p99_us"] == pytest.approx(np.percentile(want["lat"], 99))
    assert row["lat_max_us"] == pytest.approx(max(want["lat"])) and row["write_batches"] == 8
    assert row["thp_end"] == pytest.approx(want["thp_end"]) and row["sim_ms"] == want["sim_ms"]
    assert not row["oom"] and row["policy"] == policy and row["scenario"] == "tiny"
    if policy == "upstream":
        assert row["thp_split_pmd"] == 4 and row["pgfault"] == 2048 and row["thp_fault_alloc"] == 0
    else:
        assert row["thp_split_pmd"] == 0 and row["thp_fault_alloc"] == 4 and row["sim_huge_cow"] == 4


def test_per_op_records_add_up_to_the_summary(tiny):
    res = run_compare(tiny)
    for pol, row in res.summary.set_index("policy").iterrows():
        ops = res.ops[res.ops["policy"] == pol]
        after_fork = ops[ops["seq"] >= ops.loc[ops["kind"] == "fork", "seq"].iloc[0]]
        for name in COUNTERS:                      # no khugepaged work in 20 ms: every event is in some op
            assert after_fork[name].sum() == row[name], (pol, name)
        assert ops["cost_ns"].sum() / 1e6 == pytest.approx(row["model_ms"])
        assert ops["mem_bytes"].max() / MIB == row["peak_mib"]


def test_fast_thp_coverage_matches_smaps():
    k = Kernel(ram=512 * MIB, seed=0)
    strategy = parse_strategy("collapse-after-fork:who=both")
    p = k.spawn()
    a = p.mmap(8 * MIB)
    p.madvise(a, 8 * MIB, MADV_HUGEPAGE)
    p.read(a, 2 * MIB)                              # huge zero page: not AnonHugePages
    p.write(a + 2 * MIB, 6 * MIB, 1)
    c = p.fork()
    c.write_many(a + 2 * MIB + np.arange(300) * PAGE_SIZE, 2)
    p.write(a + 6 * MIB, 1, 3)
    seen = set()
    for _ in range(2):
        for proc in (p, c):
            f = proc.smaps_fields()
            assert thp_kb(proc) == (f["Anonymous"], f["AnonHugePages"])
            seen.add(f["AnonHugePages"] / f["Anonymous"])
        strategy.phase_end(p, [c])                     # MADV_COLLAPSE of both
    assert {round(x, 3) for x in seen} == {0.667, 1.0}     # one of three THPs split in each, then collapsed


def test_phase_records_partition_the_run(tiny):
    """Per phase: vmstat deltas that add up to the run's, each live process's THP figures at the
    phase's end, smaps only when asked."""
    res = run_point(tiny, "upstream")
    assert list(res.phases) == ["load", "copy", "after"]
    assert all("smaps" not in rec and all(rec["vmstat"].values()) for rec in res.phases.values())
    for name in COUNTERS:              # the fork opens "copy"; the summary counts from just before it
        assert sum(res.phases[p]["vmstat"].get(name, 0) for p in ("copy", "after")) == res.summary[name], name
    load, copy = res.phases["load"], res.phases["copy"]
    assert load["vmstat"]["thp_fault_alloc"] == 8 and load["anon_huge_kb"] == {0: 16384}
    assert copy["vmstat"]["sim_cow_bytes"] == 8 * MIB and copy["vmstat"]["thp_split_pmd"] == 4
    # the copy phase ends after phase_end, before the child exits
    assert copy["anon_huge_kb"] == {0: 16384, 1: 8192} and copy["anon_kb"] == {0: 16384, 1: 16384}
    assert copy["anon_huge_kb"][0] == replay_tiny("upstream")["huge_before_exit"]["AnonHugePages"]
    assert set(res.phases["after"]["anon_kb"]) == {0}
    res = run_point(tiny, "upstream", smaps=True)
    assert set(res.phases["copy"]["smaps"]) == {0, 1} and "AnonHugePages:" in res.phases["copy"]["smaps"][1]


def test_children_thp_coverage(tiny):
    """thp_child_*: AnonHugePages / Anonymous of the live children over the samples."""
    rows = {p: run_point(tiny, p) for p in ("upstream", "thp-cow-v1")}
    up, series = rows["upstream"], rows["thp-cow-v1"]
    kid = pd.Series(up.samples["child_thp_coverage"]).dropna()
    assert len(kid) and up.summary["thp_child_min"] == kid.min() and up.summary["thp_child_end"] == kid.iloc[-1]
    assert up.summary["thp_child_end"] == 0.5 and series.summary["thp_child_min"] == 1.0
    assert up.summary["thp_min"] == up.summary["thp_end"] == 1.0          # the parent keeps its THPs
    assert np.isnan(up.samples["child_thp_coverage"][0])                   # no child before the fork


def test_only_the_runner_calls_the_policy_hooks():
    """A strategy's before_fork and phase_end and a build's cost_bytes are called from one method
    of the runner each, nowhere else outside the kernel; the real-kernel runner (lab/realrun.py)
    calls the strategy hooks too, so that a strategy runs for real as it runs simulated."""
    import pathlib
    import re
    root = pathlib.Path(thpcow.__file__).parent
    calls = {}
    for path in root.rglob("*.py"):
        if "kernel" in path.relative_to(root).parts:
            continue
        for m in re.finditer(r"\.(before_fork|phase_end|cost_bytes)\(", path.read_text()):
            calls.setdefault(m.group(1), []).append(path.relative_to(root).as_posix())
    calls = {k: sorted(v) for k, v in calls.items()}
    assert calls == {"before_fork": ["experiments/runner.py", "lab/realrun.py"],
                     "phase_end": ["experiments/runner.py", "lab/realrun.py"],
                     "cost_bytes": ["experiments/runner.py"]}


def test_demo_is_the_runner_on_fork_touch():
    """fork_cow_demo runs the fork-touch workload through the runner; same figures as doing it by hand."""
    from thpcow.kernel.vmstat import delta
    from thpcow.scenarios import fork_cow_demo
    res = fork_cow_demo(size_mib=8, writes_per_2m=3, seed=1)
    k = Kernel(ram=1 << 30, seed=1)
    p = k.spawn()
    a = p.mmap(8 * MIB)
    p.madvise(a, 8 * MIB, MADV_HUGEPAGE)
    b = k.vmstat_snapshot()
    p.write(a, 8 * MIB, 1)
    want = {"populate": delta(k.vmstat_snapshot(), b)}
    huge = {"parent after populate": p.smaps_fields()["AnonHugePages"]}
    c = p.fork()
    b = k.vmstat_snapshot()
    c.write_many(a + (np.arange(4)[:, None] * 512 + np.arange(3)).ravel() * PAGE_SIZE, 2)
    want["child writes"] = delta(k.vmstat_snapshot(), b)
    huge["parent after child writes"] = p.smaps_fields()["AnonHugePages"]
    huge["child after child writes"] = c.smaps_fields()["AnonHugePages"]
    smaps = {"parent": p.smaps(), "child": c.smaps()}
    b = k.vmstat_snapshot()
    c.exit()
    want["child exit"] = delta(k.vmstat_snapshot(), b)
    huge["parent after child exit"] = p.smaps_fields()["AnonHugePages"]
    assert res["deltas"] == want and res["anon_huge_kb"] == huge and res["smaps"] == smaps
    assert want["child writes"]["thp_split_pmd"] == 4 and want["child writes"]["sim_cow_pages"] == 12
    assert huge == {"parent after populate": 8192, "parent after child writes": 8192,
                    "child after child writes": 0, "parent after child exit": 8192}
    code, text = run_cli("demo", "--json", "--size-mib", "4")
    assert code == 0 and json.loads(text)["deltas"]["child writes"]["thp_split_pmd"] == 2


def test_tlb_misses_come_from_the_machine_model(tiny):
    pytest.importorskip("thpcow.machine")
    df = thpcow.compare(tiny).set_index("policy")
    # the child's 2048 stores hit 4 KiB pages under upstream, four 2 MiB pages under the series
    assert df.loc["upstream", "tlb_misses"] >= 2048 > 100 * df.loc["thp-cow-v1", "tlb_misses"]
    assert df.loc["upstream", "tlb_ms"] > df.loc["thp-cow-v1", "tlb_ms"] > 0


def test_tlb_model_off_skips_the_tlb_columns_and_nothing_else(tiny, tmp_path):
    """tlb_model: false (or compare --no-tlb) runs no TLB model: its columns are NaN, every
    kernel counter is the same."""
    on = thpcow.compare(tiny).set_index("policy")
    text = open(tiny).read()
    path = tmp_path / "off.yaml"
    path.write_text("tlb_model: false\n" + text)
    sc = load_scenario(str(path))
    assert sc.tlb_model is False and sc.to_dict()["tlb_model"] is False
    off = thpcow.compare(str(path)).set_index("policy")
    assert off["tlb_misses"].isna().all() and off["tlb_ms"].isna().all()
    for col in ("cow_mib", "peak_mib", "pgfault", "thp_split_pmd", "sim_cow_pages"):
        assert (on[col] == off[col]).all(), col
    code, out = run_cli("compare", tiny, "--no-tlb", "--out", str(tmp_path / "cli"), "--policy", "upstream")
    assert code == 0, out
    df = pd.read_parquet(os.path.join(tmp_path / "cli", "summary.parquet"))
    assert df["tlb_misses"].isna().all()


def test_compare_is_deterministic(tiny):
    a, b = thpcow.compare(tiny), thpcow.compare(tiny)
    pd.testing.assert_frame_equal(a, b)
    assert list(a.columns) == list(SUMMARY_SCHEMA) and list(a["policy"]) == ["upstream", "thp-cow-v1"]


def test_compare_writes_parquet_and_report(tiny, tmp_path):
    out = str(tmp_path / "out")
    df = thpcow.compare(tiny, policies=["upstream", "cow-density:threshold=16"], out=out)
    for name in ("summary.parquet", "ops.parquet", "samples.parquet", "report.html", "scenario.yaml"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    pd.testing.assert_frame_equal(pd.read_parquet(os.path.join(out, "summary.parquet")), df)
    html = open(os.path.join(out, "report.html")).read()
    assert html.count("data:image/png;base64,") == 4 and "verdict:" in html and "cow-density:threshold=16" in html
    samples = pd.read_parquet(os.path.join(out, "samples.parquet"))
    assert samples["thp_coverage"].between(0, 1).all()
    assert all(s["t_ns"].is_monotonic_increasing for _p, s in samples.groupby("policy"))
    assert load_scenario(os.path.join(out, "scenario.yaml")).policies == ["upstream", "cow-density:threshold=16"]
    assert not [f for f in os.listdir(out) if f.startswith(".")]


def test_compare_api_options(tiny):
    df = thpcow.compare(tiny, policies=["pre-5.8"], seed=9)
    assert list(df["policy"]) == ["pre-5.8"] and df["seed"].iloc[0] == 9
    with pytest.raises(ScenarioError, match="unknown COW policy 'nope'"):
        thpcow.compare(tiny, policies=["nope"])
    with pytest.raises(ValueError, match="seed=-1"):
        thpcow.compare(tiny, seed=-1)
    d = {"ram_mib": 256, "sysfs": {"enabled": "madvise"},
         "workload": {"name": "forkserver", "data_mib": 8, "children": 20, "hot_mib": 1}}
    assert thpcow.compare(d)["workload"].iloc[0] == "forkserver"


def test_out_of_memory_is_a_result(tmp_path):
    sc = {"name": "oom", "ram_mib": 64, "sysfs": {"enabled": "madvise"},
          "workload": {"name": "copy-after-fork", "size_mib": 40, "copy_mib": 40, "range_kib": 2048},
          "policies": ["upstream"]}
    df = thpcow.compare(sc)
    assert bool(df["oom"].iloc[0]) and df["peak_mib"].iloc[0] > 60
    assert "out of memory: upstream" in report.verdict(df)


def test_verdict_names_the_leaders():
    row = dict(collapse_mib=0.0, bg_ms=0.0, oom=False, oops="")
    df = pd.DataFrame([
        dict(row, policy="upstream", lat_p99_us=10.0, cow_mib=4.0, peak_mib=100.0, thp_mean=0.2, model_ms=5.0),
        dict(row, policy="thp-cow-v1", lat_p99_us=300.0, cow_mib=64.0, peak_mib=160.0, thp_mean=1.0, model_ms=9.0),
    ])
    v = report.verdict(df)
    assert v.startswith("verdict: lowest p99 write-op latency: upstream (10.0 µs) "
                        "[ranked by this: --rank-by p99, the default]")
    assert "best THP coverage (mean): thp-cow-v1 (1.00)" in v and "\n" not in v
    assert report.verdict(df.iloc[:1]).startswith("verdict: lowest p99")
    better = df.assign(thp_mean=[1.0, 0.2])
    assert report.verdict(better).startswith("verdict: upstream is best on every count")
    # the user's ranking leads the verdict and orders the rows
    assert report.verdict(df, "thp").startswith("verdict: best THP coverage (mean): thp-cow-v1 (1.00) "
                                                "[ranked by this: --rank-by thp]")
    assert list(report.ranked(df, "thp")["policy"]) == ["thp-cow-v1", "upstream"]
    assert list(report.ranked(df, "p99")["policy"]) == ["upstream", "thp-cow-v1"]


def test_verdict_lists_every_tied_policy_and_counts_collapse_copies_apart():
    row = dict(lat_p99_us=10.0, peak_mib=100.0, thp_mean=0.5, model_ms=5.0, bg_ms=0.0, oom=False, oops="")
    df = pd.DataFrame([dict(row, policy=f"p{i}", cow_mib=4.0, collapse_mib=float(i)) for i in range(4)])
    v = report.verdict(df)
    assert "lowest p99 write-op latency: p0, p1, p2, p3 (10.0 µs)" in v
    assert "least COW bytes copied: p0, p1, p2, p3 (4.0 MiB)" in v
    assert "least bytes copied in all (COW + collapse): p0 (4.0 MiB)" in v
    # background time counts in the CPU ranking
    df2 = df.assign(bg_ms=[9.0, 0.0, 0.0, 0.0], model_ms=[1.0, 5.0, 5.0, 6.0])
    assert "lowest CPU time (fg + bg): p1, p2 (5.0 ms)" in report.verdict(df2)


def test_default_scenario_runs_in_seconds():
    df = thpcow.compare(None, policies=["upstream"])
    row = df.iloc[0]
    assert row["thp_split_pmd"] == 128 and row["cow_mib"] > 0 and row["lat_p99_us"] > row["lat_p50_us"] > 0
    assert 0 <= row["thp_min"] < row["thp_end"] == 1.0     # split by COW, collapsed again by khugepaged


# -- the command line ---------------------------------------------------------------------------
def run_cli(*args):
    from typer.testing import CliRunner

    from thpcow.cli import app

    res = CliRunner().invoke(app, list(args))
    return res.exit_code, res.output + (getattr(res, "stderr", "") if res.stderr_bytes is not None else "")


def test_cli_compare(tiny, tmp_path):
    out = str(tmp_path / "cli")
    code, text = run_cli("compare", tiny, "--out", out, "--policy", "upstream", "--policy", "mthp-cow:order=4")
    assert code == 0, text
    assert "mthp-cow:order=4" in text and "verdict:" in text and os.path.exists(os.path.join(out, "report.html"))
    assert [ln for ln in text.splitlines() if ln.startswith("verdict:")]
    assert "latency profile: lab-vm-zen4-warm (the reference profile)" in text
    cells = printed_row(text, "upstream")
    df = pd.read_parquet(os.path.join(out, "summary.parquet")).set_index("policy")
    assert cells == report.table_rows(df.reset_index())[0]
    assert cells[1:6] == ["8.0", "0.0", "0.0", f"{df.loc['upstream', 'peak_mib']:.1f}", "2048"]


def printed_row(text: str, policy: str) -> list[str]:
    """A policy's cells over all the printed tables (a narrow terminal splits the table)."""
    cells: list[str] = []
    for line in text.splitlines():
        if line.startswith(f"│ {policy} "):
            got = [c.strip() for c in line.strip().strip("│").split("│")]
            cells += got if not cells else got[1:]
    return cells


@pytest.mark.parametrize("width", [80, 120, 200])
def test_cli_compare_prints_every_name_and_number_whole(tiny, tmp_path, width, monkeypatch):
    """At 80, 120 and 200 columns every line fits, every policy name and every cell is printed whole."""
    monkeypatch.setenv("COLUMNS", str(width))
    from thpcow.cli import common
    monkeypatch.setattr(common.console, "_width", width, raising=False)
    code, text = run_cli("compare", tiny, "--out", str(tmp_path / "o"), "--policy", "upstream",
                         "--policy", "collapse-after-fork:who=parent", "--policy", "cow-density:threshold=64")
    assert code == 0, text
    df = pd.read_parquet(os.path.join(tmp_path / "o", "summary.parquet"))
    want = {r[0]: r for r in report.table_rows(df)}
    for pol in ("upstream", "collapse-after-fork:who=parent", "cow-density:threshold=64"):
        assert printed_row(text, pol) == want[pol], pol
    table_lines = [ln for ln in text.splitlines() if ln[:1] in "┏┃┡│└"]
    assert max(len(ln.rstrip()) for ln in table_lines) <= width
    tables = len([ln for ln in text.splitlines() if ln.startswith("┏")])
    assert tables == len(report.table_chunks(list(want.values()), width))
    assert tables > 1 if width < 200 else tables <= 2


def test_cli_compare_errors(tmp_path, tiny):
    badfile = tmp_path / "bad.yaml"
    badfile.write_text("workload:\n  name: forkserver\n  children: -3\n")
    code, text = run_cli("compare", str(badfile))
    assert code == 2 and "bad.yaml:3: workload.children:" in text and "must be >= 1" in text
    code, text = run_cli("compare", tiny, "--policy", "thp-cow-v2")
    assert code == 2 and "unknown COW policy 'thp-cow-v2'" in text
    code, text = run_cli("compare", str(tmp_path / "missing.yaml"))
    assert code == 2 and "no such scenario file" in text
    code, text = run_cli("compare", tiny, "--seed", "-5")
    assert code == 2 and set(text.strip().splitlines()) == {"thpcow: --seed=-5: must be >= 0"}   # one line
    code, text = run_cli("compare", tiny, "--rank-by", "speed")
    assert code == 2 and "--rank-by=speed: expected one of p99, cow, copied, peak, thp, cpu" in text
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    code, text = run_cli("compare", tiny, "--out", str(ro / "x"))
    if os.geteuid() != 0:                                # root writes anywhere
        assert code == 2 and f"--out={ro / 'x'}: cannot write there" in text
    code, text = run_cli("compare", tiny, "--out", str(tiny))
    assert code == 2 and "is not a directory" in text


def test_cli_lists_workloads():
    code, text = run_cli("workloads")
    assert code == 0 and "redis-bgsave:" in text and "  dataset_mib:" in text and "trace:" in text


@pytest.mark.parametrize("thp_cow, split, huge_cow", [("never", True, False), ("always", False, True)])
def test_the_series_knob_decides_in_compare(tmp_path, thp_cow, split, huge_cow):
    """The upstream build carries the series: the scenario's sysfs thp_cow alone decides."""
    path = tmp_path / "knob.yaml"
    path.write_text(TINY.replace("  enabled: madvise\n", f"  enabled: madvise\n  thp_cow: {thp_cow}\n")
                    .replace("policies: [upstream, thp-cow-v1]", "policies: [upstream]"))
    row = compare(str(path)).set_index("policy").loc["upstream"]
    assert (row["thp_split_pmd"] > 0) == split
    assert (row["sim_huge_cow"] > 0) == huge_cow


# -- the per-op rows add up to the summary ---------------------------------------------------------
ROWS_SUM = {"name": "rows-sum", "ram_mib": 1024, "seed": 3,
            "sysfs": {"khugepaged/scan_sleep_millisecs": "10"},
            "workload": {"name": "copy-after-fork", "size_mib": 8, "copy_mib": 4, "range_kib": 64,
                         "order": "random", "fork_after_ms": 2, "hold_ms": 300},
            "policies": ["upstream", "thp-cow-meant", "mthp-cow:order=4"]}


@pytest.mark.parametrize("policy", ROWS_SUM["policies"])
def test_ops_rows_sum_to_the_summary(policy):
    """Every counter of the summary is the sum of the since-fork rows (khugepaged's work in
    ``kthread`` rows included); times are sums of cost_ns; latencies are quantiles of the
    measured phase's write rows; bytes moved are reported apart."""
    import pandas as pd
    res = run_point(ROWS_SUM, policy)
    s = res.summary
    ops = pd.DataFrame(res.ops)
    since = ops[ops["since_fork"]]
    for c in COUNTERS:
        assert since[c].sum() == s[c], c
    assert s["cow_mib"] * MIB == since["sim_cow_bytes"].sum()
    assert s["collapse_mib"] * MIB == since["sim_collapse_bytes"].sum()
    assert s["zero_mib"] * MIB == since["sim_zero_bytes"].sum()
    bg = ops["kind"] == "kthread"
    assert s["model_ms"] == pytest.approx(ops.loc[~bg, "cost_ns"].sum() / 1e6)
    assert s["bg_ms"] == pytest.approx(ops.loc[bg, "cost_ns"].sum() / 1e6)
    assert s["ops"] == int((~bg).sum())
    writes = ops[(ops["kind"] == "write") & (ops["phase"] == "copy")]["cost_ns"] / 1000
    assert s["lat_p99_us"] == pytest.approx(np.percentile(writes, 99))
    assert s["lat_p999_us"] == pytest.approx(np.percentile(writes, 99.9))
    assert s["lat_max_us"] == pytest.approx(writes.max())
    if policy == "upstream":
        # khugepaged collapsed the split THPs again: its copies and its time are in kthread rows
        assert s["thp_collapse_alloc"] > 0 and ops.loc[bg, "thp_collapse_alloc"].sum() == s["thp_collapse_alloc"]
        assert s["collapse_mib"] == 2 * s["thp_collapse_alloc"] and s["bg_ms"] > 0
        assert s["cow_mib"] < s["cow_mib"] + s["collapse_mib"]
    if policy == "thp-cow-meant":
        assert s["zero_mib"] >= 2 * s["sim_huge_cow"]        # each whole-THP copy clears its 2 MiB first


def test_rows_of_a_run_stopped_by_an_oops_still_sum_to_the_summary():
    import pandas as pd
    d = dict(ROWS_SUM, sysfs={"khugepaged/scan_sleep_millisecs": "10", "thp_cow": "never"})
    res = run_point(d, "thp-cow-v1")
    assert res.summary["oops"]
    ops = pd.DataFrame(res.ops)
    since = ops[ops["since_fork"]]
    for c in COUNTERS:
        assert since[c].sum() == res.summary[c], c


def test_a_calibration_profile_prices_the_run_and_is_named(tiny, tmp_path):
    """--profile (or profile: in the scenario) prices every op with that profile's costs."""
    import json
    from dataclasses import replace

    from thpcow.experiments.costs import host_cpu
    from thpcow.machine.cost_presets import host_cpu_id, host_kernel
    from thpcow.machine.latency import DEFAULT_PROFILE

    slow = replace(DEFAULT_PROFILE, name="slow-cow", cow_4k_ns=DEFAULT_PROFILE.cow_4k_ns * 10, cpu=host_cpu(),
                   cpu_id=host_cpu_id(), kernel=host_kernel())
    path = str(tmp_path / "slow.toml")
    slow.save(path)
    code, text = run_cli("compare", tiny, "--policy", "upstream", "--json", "--out", str(tmp_path / "a"))
    assert code == 0
    base = json.loads(text[text.index("{"):text.rindex("}") + 1])
    code, text = run_cli("compare", tiny, "--policy", "upstream", "--json", "--profile", path,
                         "--out", str(tmp_path / "b"))
    assert code == 0
    got = json.loads(text[text.index("{"):text.rindex("}") + 1])
    assert got["profile"] == {"name": "slow-cow", "path": path, "cpu": host_cpu()}
    assert got["rows"][0]["lat_p50_us"] > 5 * base["rows"][0]["lat_p50_us"]
    assert "slow-cow" in got["rows"][0]["latency_model"]
    assert "warning:" not in text                              # measured on this CPU and kernel: no warning
    code, text = run_cli("compare", tiny, "--policy", "upstream", "--json", "--profile", "amd-zen5-turin",
                         "--out", str(tmp_path / "c"))                # a cost preset, by name
    assert code == 0, text
    got = json.loads(text[text.index("{"):text.rindex("}") + 1])
    assert got["profile"]["name"] == "amd-zen5-turin" and "amd-zen5-turin" in got["rows"][0]["latency_model"]
    code, text = run_cli("compare", tiny, "--profile", str(tmp_path / "none.toml"))
    assert code == 2 and "--profile=" in text and "no such profile file" in text
    named = tmp_path / "named.yaml"                             # profile: in the scenario, a preset's name
    named.write_text(open(tiny).read() + "profile: amd-zen5-turin\n")
    code, text = run_cli("compare", str(named), "--policy", "upstream", "--json", "--out", str(tmp_path / "d"))
    assert code == 0, text
    got = json.loads(text[text.index("{"):text.rindex("}") + 1])
    assert got["profile"]["name"] == "amd-zen5-turin"
    named.write_text(open(tiny).read() + "profile: no-such-preset\n")
    code, text = run_cli("compare", str(named))
    assert code == 2 and "profile" in text and "no such profile file or cost preset" in text


def test_the_report_is_whole_html_with_its_plots_and_names_its_profile(tiny, tmp_path):
    """The HTML report parses; every plot is a decodable PNG of the figure size; the table
    scrolls instead of overflowing; the Parquet files carry units and the scenario."""
    import base64
    import html.parser
    import json
    import struct

    import pyarrow.parquet as pq

    out = str(tmp_path / "r")
    compare(tiny, ["upstream", "collapse-after-fork:who=parent", "thp-cow-meant"], out=out)

    class P(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.stack, self.imgs, self.table_in_scroll, self.text = [], [], False, []

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "img":
                self.imgs.append(a)
            if tag == "table" and any(t == ("div", "scroll") for t in self.stack):
                self.table_in_scroll = True
            if tag not in ("img", "meta", "br"):
                self.stack.append((tag, a.get("class")))

        def handle_endtag(self, tag):
            while self.stack and self.stack.pop()[0] != tag:
                pass

        def handle_data(self, data):
            self.text.append(data)

    p = P()
    with open(os.path.join(out, "report.html"), encoding="utf-8") as fh:
        p.feed(fh.read())
    assert not p.stack, f"unclosed tags: {p.stack}"
    assert p.table_in_scroll
    titles = [i["alt"] for i in p.imgs]
    assert titles == ["THP coverage over time", "Write-op latency tail", "Memory over time", "Cost and benefit"]
    for img in p.imgs:
        png = base64.b64decode(img["src"].split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert struct.unpack(">II", png[16:24]) == (800, 400)          # 8 x 4 in at 100 dpi
    text = " ".join(p.text)
    assert "lab-vm-zen4-warm" in text and "verdict:" in text
    schema = pq.read_schema(os.path.join(out, "summary.parquet"))
    meta = json.loads(schema.metadata[b"thpcow"])
    assert meta["scenario"] == "tiny" and meta["seed"] == 5 and meta["profile"] == "reference"
    assert schema.field("cow_mib").metadata[b"unit"] == b"MiB"
    assert schema.field("lat_p99_us").metadata[b"unit"] == "µs".encode()
    assert pq.read_schema(os.path.join(out, "ops.parquet")).field("cost_ns").metadata[b"unit"] == b"ns"


def test_coinciding_curves_are_named_in_the_legend():
    import numpy as np
    x = np.arange(3)
    labels = report._coincide({"a": (x, x * 1.0), "b": (x, x * 1.0), "c": (x, x * 2.0)})
    assert labels == {"a": "a", "b": "b (= a)", "c": "c"}


# -- reads and one clock -----------------------------------------------------------------------------
READ_HEAVY = {"name": "read-heavy-small", "ram_mib": 512, "tlb_in_latency": True, "sysfs": {"enabled": "madvise"},
              "workload": {"name": "redis-bgsave", "dataset_mib": 64, "writes_per_s": 20000,
                           "reads_per_s": 6000000, "key_dist": "uniform", "tail_ms": 100},
              "policies": ["upstream", "thp-cow-meant"]}


def test_one_clock_adds_each_ops_translation_time_to_its_cost():
    """tlb_in_latency: every op's cost grows by the translation time the TLB model charged it;
    the run's foreground time grows by at least the translation time after the fork."""
    import pandas as pd
    on = run_point(READ_HEAVY, "upstream")
    off = run_point(dict(READ_HEAVY, tlb_in_latency=False), "upstream")
    a, b = pd.DataFrame(on.ops), pd.DataFrame(off.ops)
    assert list(a["kind"]) == list(b["kind"])
    extra = a["cost_ns"] - b["cost_ns"]
    assert (extra >= 0).all() and extra[a["kind"] == "read"].sum() > 0
    assert on.summary["model_ms"] - off.summary["model_ms"] == pytest.approx(extra.sum() / 1e6)
    assert on.summary["model_ms"] - off.summary["model_ms"] >= on.summary["tlb_ms"] * 0.999
    assert off.summary["tlb_ms"] == pytest.approx(on.summary["tlb_ms"])


def test_a_read_heavy_service_trades_memory_for_time():
    """With heavy reads after the fork and translation on the clock, keeping THPs (the series
    as meant) costs memory but wins time; upstream wins on memory (and on write-op p99)."""
    df = thpcow.compare(READ_HEAVY).set_index("policy")
    up, series = df.loc["upstream"], df.loc["thp-cow-meant"]
    assert series["model_ms"] < up["model_ms"]                     # the kept THPs pay back
    assert series["tlb_ms"] < up["tlb_ms"] / 10
    assert up["peak_mib"] < series["peak_mib"]                     # upstream copies 4 KiB, not 2 MiB
    assert up["lat_p99_us"] < series["lat_p99_us"]
    no_reads = thpcow.compare(dict(READ_HEAVY, workload=dict(READ_HEAVY["workload"], reads_per_s=0)))
    no_reads = no_reads.set_index("policy")
    assert no_reads.loc["upstream", "model_ms"] < no_reads.loc["thp-cow-meant", "model_ms"]   # the crossover
