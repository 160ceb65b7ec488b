"""One clock: the closed and open loops, the cores rule, and what a run reports under them."""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
import pytest

from thpcow.experiments import report
from thpcow.experiments.loop import Loop
from thpcow.experiments.runner import run_compare, run_point
from thpcow.experiments.scenario import ScenarioError, load_scenario, parse_scenario, resolve_scenario
from thpcow.workloads import get_workload
from thpcow.workloads import ops as O
from thpcow.workloads.ops import Op

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "scenarios")


def drive(ops, mode, costs, think_ns=0.0, cores=0, background=None):
    """Run a stream through a Loop: ``costs(seq, op)`` prices each op; ``background`` {seq: ns} is
    kernel-thread time just before that op.  Returns {seq: (start, end, latency)}."""
    loop = Loop(ops, mode, think_ns, cores)
    out = {}
    for it in loop:
        if background and it.seq in background:
            loop.background(background[it.seq])
        end, lat = loop.finish(it, costs(it.seq, it.op))
        out[it.seq] = (it.start, end, lat)
    return out


def one_client(n=6, gap=100):
    return [Op(0, O.SPAWN, 0)] + [Op(10 + i * gap, O.WRITE, 0) for i in range(n)]


def test_none_keeps_the_workloads_times_and_latency_is_the_cost():
    got = drive(one_client(), "none", lambda s, op: 500.0)
    assert [v[0] for v in got.values()] == [0, 10, 110, 210, 310, 410, 510]
    assert all(v[2] == 500.0 for v in got.values())


def test_closed_loop_delays_the_later_ops_by_exactly_the_extra_cost():
    base = drive(one_client(), "closed", lambda s, op: 10.0)
    slow = drive(one_client(), "closed", lambda s, op: 10.0 + (37.0 if s == 3 else 0.0))
    assert [base[s][0] for s in range(4)] == [slow[s][0] for s in range(4)]
    assert all(slow[s][0] - base[s][0] == 37.0 for s in range(4, 7))
    # Each op starts after the previous one completed plus the workload's gap (its think time).
    for s in range(2, 7):
        assert base[s][0] == base[s - 1][1] + 100
    assert all(v[2] == 10.0 for v in base.values())        # no queueing in a closed loop
    think = drive(one_client(), "closed", lambda s, op: 10.0, think_ns=5.0)
    assert all(think[s][0] - base[s][0] == 5.0 * s for s in range(1, 7))   # after every op, the spawn too


def test_open_loop_queues_behind_a_busy_client():
    ops = [Op(0, O.SPAWN, 0)] + [Op(t, O.WRITE, 0) for t in (100, 110, 120, 500)]
    got = drive(ops, "open", lambda s, op: 25.0 if op.kind == O.WRITE else 0.0)
    assert [got[s][0] for s in range(1, 5)] == [100, 125, 150, 500]
    assert [got[s][2] for s in range(1, 5)] == [25, 40, 55, 25]      # the wait is part of the latency
    # Another client is not held up by this one.
    ops2 = ops + [Op(0, O.SPAWN, 1), Op(111, O.WRITE, 1)]
    ops2.sort(key=lambda op: op.t)
    got2 = drive(ops2, "open", lambda s, op: 25.0 if op.kind == O.WRITE else 0.0)
    w1 = next(s for s, op in enumerate(ops2) if op.pid == 1 and op.kind == O.WRITE)
    assert got2[w1][0] == 111 and got2[w1][2] == 25


def test_ops_start_in_time_order_across_clients_and_a_child_inherits_the_shift():
    ops = [Op(0, O.SPAWN, 0), Op(0, O.WRITE, 0), Op(10, O.FORK, 0, arg=1), Op(20, O.WRITE, 1),
           Op(20, O.WRITE, 0), Op(30, O.WRITE, 1)]
    cost = {1: 1000.0, 2: 50.0, 3: 5.0, 4: 5.0, 5: 5.0}
    loop = Loop(ops, "closed")
    order = []
    for it in loop:
        order.append((it.seq, it.start))
        loop.finish(it, cost.get(it.seq, 0.0))
    starts = dict(order)
    assert starts[2] == 1010                       # the fork waits for the parent's slow write
    assert starts[3] == 20 + (1060 - 10)           # the child starts with the parent's shift at the fork
    assert [s for s, _t in order] == sorted(range(6), key=lambda s: (starts[s], s))
    assert [t for _s, t in order] == sorted(t for _s, t in order)


def test_phase_end_waits_for_every_earlier_op_and_later_ops_wait_for_it():
    ops = [Op(0, O.SPAWN, 0), Op(0, O.FORK, 0, arg=1), Op(1, O.WRITE, 1), Op(2, O.PHASE_END, 0),
           Op(3, O.WRITE, 0), Op(4, O.EXIT, 1)]
    got = drive(ops, "open", lambda s, op: 1000.0 if s == 2 else 1.0)
    assert got[3][0] == got[2][1] == 1002          # phase_end after the child's slow write
    assert got[4][0] >= got[3][1] and got[5][0] >= got[3][1]


@pytest.mark.parametrize("cores, clients, each", [(0, 1, 0.0), (1, 1, 300.0), (2, 1, 0.0), (2, 2, 150.0),
                                                   (3, 2, 0.0), (1, 3, 100.0)])
def test_cores_rule(cores, clients, each):
    """L live clients, one background thread, N cores: L + 1 > N takes min(1, L + 1 - N) of the
    background's time from the clients, each next op later by its share / L."""
    ops = [Op(0, O.SPAWN, p) for p in range(clients)] + [Op(100, O.WRITE, p) for p in range(clients)]
    bg = {clients: 300.0}
    got = drive(ops, "closed", lambda s, op: 10.0, cores=cores, background=bg)
    for s in range(clients, 2 * clients):
        assert got[s][1] - got[s][0] == pytest.approx(10.0 + each)


def test_bad_loop():
    with pytest.raises(ValueError, match="loop"):
        Loop([], "sometimes")


# -- runs -------------------------------------------------------------------------------------
def small(loop="closed", **extra):
    wl = dict(name="copy-after-fork", size_mib=16, copy_mib=8, range_kib=1024, writer="parent",
              copy_mib_s=2048, fork_after_ms=1, hold_ms=1, reads_per_s=2_000_000)
    wl.update(extra.pop("workload", {}))
    return {"name": "loop-small", "ram_mib": 256, "sysfs": {"enabled": "madvise"}, "loop": loop, "workload": wl,
            **extra}


def test_a_closed_run_shifts_each_op_by_the_cost_of_the_ones_before_it():
    sc = resolve_scenario(small())
    res = run_point(sc, "upstream")
    ops = pd.DataFrame(res.ops)
    stream = list(sc.make_workload().ops(sc.seed))
    mine = ops[(ops["kind"] != "kthread") & (ops["pid"] == 0)]
    done = 0.0
    for seq, t, cost in zip(mine["seq"], mine["t_ns"], mine["cost_ns"]):
        if stream[seq].kind in (O.PHASE_END, O.END):
            break                                   # barriers also wait for the child
        assert t == math.ceil(stream[seq].t + done)
        done += cost
    assert res.summary["end_ms"] * 1e6 > stream[-1].t + 0.9 * done
    # Latency is the cost: no queueing in a closed loop.
    assert np.allclose(ops["lat_ns"], ops["cost_ns"])


def test_an_open_run_queues_and_counts_the_wait():
    sc = resolve_scenario(small("open", workload=dict(reads_per_s=8_000_000, read_batch_ms=0.05)))
    ops = pd.DataFrame(run_point(sc, "thp-cow-meant").ops)
    work = ops[ops["kind"] != "kthread"]
    assert (work["lat_ns"] >= work["cost_ns"] - 1e-6).all()
    assert (work["lat_ns"] > work["cost_ns"] + 1000).any()       # some ops waited behind a 2 MiB copy
    for _pid, g in work.groupby("pid"):                           # one op at a time per client
        assert (g["t_ns"].to_numpy()[1:] >= np.floor(g["end_ns"].to_numpy()[:-1])).all()


def test_loop_none_is_the_old_clock():
    sc = resolve_scenario(small("none"))
    res = run_point(sc, "upstream")
    ops = pd.DataFrame(res.ops)
    stream = list(sc.make_workload().ops(sc.seed))
    work = ops[ops["kind"] != "kthread"]
    assert list(work["t_ns"]) == [stream[s].t for s in work["seq"]]
    assert (ops["lat_ns"] == ops["cost_ns"]).all()
    assert res.summary["loop"] == "none"


def test_closed_runs_are_deterministic():
    sc = small(sysfs={"enabled": "madvise", "khugepaged/scan_sleep_millisecs": "1"}, cores=1)
    a, b = run_compare(sc, ["upstream", "thp-cow-meant"]), run_compare(sc, ["upstream", "thp-cow-meant"])
    pd.testing.assert_frame_equal(a.summary, b.summary)
    pd.testing.assert_frame_equal(a.ops, b.ops)


def test_background_on_one_core_slows_the_clients():
    """khugepaged collapses the parent's split PMDs after the child exits; with one core for it
    and the client, its time delays the client's next ops."""
    wl = dict(reads_per_s=1_000_000, hold_ms=1)
    base = dict(sysfs={"enabled": "madvise", "khugepaged/scan_sleep_millisecs": "1",
                       "khugepaged/alloc_sleep_millisecs": "1"},
                workload=dict(wl, writer="child", copy_mib_s=512))
    free = run_point(small(**base), "upstream").summary
    one = run_point(small(cores=1, **base), "upstream").summary
    assert free["bg_ms"] > 0
    assert one["end_ms"] > free["end_ms"]


@pytest.mark.parametrize("text, field", [("loop: sometimes", "loop"), ("loop: 1", "loop"),
                                         ("loop: closed\nthink_us: -1", "think_us"),
                                         ("loop: closed\ncores: -1", "cores"), ("cores: 1.5", "cores")])
def test_bad_loop_fields_are_named(text, field):
    with pytest.raises(ScenarioError, match=field) as exc:
        parse_scenario(text + "\nworkload: {name: copy-after-fork}\n", "x.yaml")
    assert exc.value.line is not None


def test_loop_fields_round_trip():
    sc = parse_scenario("loop: closed\nthink_us: 2.5\ncores: 2\nworkload: {name: copy-after-fork}\n")
    back = parse_scenario(sc.to_yaml())
    assert (back.loop, back.think_us, back.cores) == ("closed", 2.5, 2)
    assert "loop" not in parse_scenario("workload: {name: copy-after-fork}\n").to_dict()


# -- the read-heavy scenario and the crossover chart --------------------------------------------
def read_heavy_small():
    sc = load_scenario(os.path.join(DOCS, "read-heavy-closed.yaml"))
    from dataclasses import replace
    return replace(sc, ram_mib=512, params=dict(sc.params, dataset_mib=64, reads_per_s=8_000_000, tail_ms=100,
                                                 scan_mib_s=1024))


def test_read_heavy_after_fork_keeping_thps_wins_throughput_upstream_wins_memory(tmp_path):
    res = run_compare(read_heavy_small(), ["upstream", "thp-cow-meant"])
    s = res.summary.set_index("policy")
    assert s.loc["thp-cow-meant", "ops_per_s"] > 1.02 * s.loc["upstream", "ops_per_s"]
    assert s.loc["thp-cow-meant", "loads_per_s"] > 1.02 * s.loc["upstream", "loads_per_s"]
    assert s.loc["upstream", "peak_mib"] < 0.7 * s.loc["thp-cow-meant", "peak_mib"]
    assert "best throughput (read and write ops/s): thp-cow-meant" in report.verdict(res.summary)
    # The crossover: behind right after the fork (the copies), ahead at the end.
    c = report.crossover(res.ops, ["upstream", "thp-cow-meant"])["thp-cow-meant"]
    assert c["y"].min() < 0 < c["y"][-1] and 0 < c["cross"] < c["x"][-1]
    html = report.render_html(res)
    assert "Crossover: loads per copied byte" in html and "ahead of upstream from" in html


def test_crossover_on_a_made_up_run():
    """Policy p copies 100 bytes at the first op, then saves 10 ns per load op of 10 loads."""
    rows = []
    for pol in ("upstream", "p"):
        for seq in range(6):
            cost = 100.0 if pol == "upstream" else (300.0 if seq == 0 else 90.0)
            rows.append(dict(policy=pol, seq=seq, kind="read", n=10, cost_ns=cost, since_fork=True,
                             sim_cow_bytes=100 if (pol == "p" and seq == 0) else 0, sim_collapse_bytes=0))
    c = report.crossover(pd.DataFrame(rows), ["upstream", "p"])["p"]
    assert np.allclose(c["x"], [0.1 * (i + 1) for i in range(6)])
    assert np.allclose(c["y"] * 1e6, [-200, -190, -180, -170, -160, -150])
    assert math.isnan(c["cross"])
    rows = [dict(r, cost_ns=10.0) if r["policy"] == "p" and r["seq"] > 0 else r for r in rows]
    c = report.crossover(pd.DataFrame(rows), ["upstream", "p"])["p"]
    # y: -200, -110, -20, 70, ...: crosses 0 between x = 0.3 and 0.4, at 0.3 + 0.1 * 20/90.
    assert c["cross"] == pytest.approx(0.3 + 0.1 * 20 / 90)


def test_no_crossover_chart_without_loads(tmp_path):
    sc = small("none", workload=dict(reads_per_s=0.0))
    res = run_compare(sc, ["upstream", "thp-cow-meant"])
    assert report.crossover(res.ops, ["upstream", "thp-cow-meant"]) == {}
    assert "Crossover" not in report.render_html(res)


def test_workload_reads_are_deterministic_under_a_loop():
    w = get_workload("copy-after-fork", reads_per_s=1000, read_dist="zipf")
    from thpcow.workloads import stream_digest
    assert stream_digest(w.ops(4)) == stream_digest(w.ops(4))


@pytest.mark.parametrize("name, params", [
    ("redis-bgsave", dict(dataset_mib=8, writes_per_s=20000, reads_per_s=200000, scan_mib_s=256, tail_ms=5)),
    ("copy-after-fork", dict(size_mib=8, copy_mib=4, range_kib=1024, reads_per_s=100000, reader="child")),
    ("prefork-server", dict(data_mib=8, workers=3, serve_ms=20, share=0.05, reads_per_tick=50)),
    ("python-refcount", dict(data_mib=8, workers=3, serve_ms=20, touches_per_s=20000)),
    ("forkserver", dict(data_mib=8, children=40, hot_mib=1, pages_per_child=4, reads_per_child=20)),
    ("fork-touch", dict(size_mib=8)),
])
@pytest.mark.parametrize("loop", ["open", "closed"])
def test_every_workload_runs_whole_under_each_loop(name, params, loop):
    """Every op of the stream is applied once, in start order, with the same kernel events as far
    as the ops' order allows; a loop never makes a run end before its workload's last op."""
    sc = {"name": "w", "ram_mib": 256, "sysfs": {"enabled": "madvise"}, "workload": dict(name=name, **params)}
    plain = run_point(sc, "upstream")
    looped = run_point(dict(sc, loop=loop, cores=1), "upstream")
    a, b = pd.DataFrame(plain.ops), pd.DataFrame(looped.ops)
    work_a, work_b = a[a["kind"] != "kthread"], b[b["kind"] != "kthread"]
    assert sorted(work_a["seq"]) == sorted(work_b["seq"]) == list(range(len(work_a)))
    assert b["t_ns"].is_monotonic_increasing
    assert (work_b["end_ns"] > work_b["t_ns"] - 1).all()          # t_ns: the start rounded up to a ns
    assert looped.summary["end_ms"] >= plain.summary["sim_ms"]
    assert looped.summary["cow_mib"] > 0 or plain.summary["cow_mib"] == 0
    assert not looped.summary["oom"] and not looped.summary["oops"]
