"""Bad input on the command line: one line on stderr naming the argument, exit status 2, nothing run.

Every case goes through ``thpcow.cli.main()`` as the installed ``thpcow``
command does (in this process, with sys.argv set), so that usage errors of
the option parser take the same one-line path as our own checks.
"""

from __future__ import annotations

import os
import sys

import pytest

from thpcow.cli import main


def run_main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["thpcow", *args])
    with pytest.raises(SystemExit) as ei:
        main()
    out, err = capsys.readouterr()
    return ei.value.code, out, err


@pytest.fixture
def tracefile(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("time_ns,pid,op,address,length,arg\n0,1,mmap,0x1000,4096,\n10,1,write,0x1000,zz,\n")
    sc = tmp_path / "tr.yaml"
    sc.write_text(f"name: tr\nworkload: {{name: trace, path: {csv}}}\n")
    return str(sc)


@pytest.mark.parametrize("args, line", [
    (["demo", "--seed", "-5"], "thpcow: --seed=-5: must be >= 0"),
    (["demo", "--writes-per-2m", "600"],
     "thpcow: --writes-per-2m=600: must be within [0, 512] (the 4 KiB pages of a 2 MiB block)"),
    (["demo", "--size-mib", "512", "--writes-per-2m", "512"],
     "thpcow: --size-mib=512 with --writes-per-2m=512: needs 1024 MiB after the fork; "
     "the demo's machine has 1024 MiB of RAM (768 for the demo)"),
    (["compare", "--seed", "abc"], "thpcow compare: Invalid value for '--seed': "),
    (["compare", "--policy", "reservation:pool_mib=-64"], "pool_mib=-64 must be >= 0"),
    (["compare", "--rank-by", "fast"], "thpcow: --rank-by=fast: expected one of p99, cow, copied, peak, thp, cpu"),
    (["demo", "--bogus"], "thpcow demo: No such option: --bogus"),
    (["nosuch"], "thpcow: No such command 'nosuch'."),
    (["inspect", "999999999"], "thpcow: pid 999999999: no such process"),
    (["inspect", "--watch", "0", "1"], "thpcow: --watch=0.0: must be > 0 (seconds)"),
    (["inspect"], "thpcow: give process ids, --cgroup PATH or --all (one of them)"),
    (["inspect", "--cgroup", "/nonexistent"], "thpcow: --cgroup=/nonexistent: cannot read"),
])
def test_bad_input_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path, args, line):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(monkeypatch, capsys, *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and line in err, err
    assert "Traceback" not in out + err
    assert not (tmp_path / "results").exists()               # nothing ran, nothing written


def test_an_absurd_ram_size_is_refused_before_anything_is_allocated(monkeypatch, capsys, tmp_path):
    sc = tmp_path / "big.yaml"
    sc.write_text("name: big\nram_mib: 100000000\nworkload: {name: forkserver}\n")
    code, _out, err = run_main(monkeypatch, capsys, "compare", str(sc), "--out", str(tmp_path / "o"))
    assert code == 2 and f"{sc}:2: ram_mib: 100000000 must be <= " in err and len(err.splitlines()) == 1


def test_a_trace_with_a_bad_row_is_refused_before_the_run(monkeypatch, capsys, tmp_path, tracefile):
    code, _out, err = run_main(monkeypatch, capsys, "compare", tracefile, "--out", str(tmp_path / "o"))
    assert code == 2 and err.strip().endswith("row 2: length='zz' is not an integer")
    assert not (tmp_path / "o").exists()


def test_out_that_cannot_be_written_is_refused_before_the_run(monkeypatch, capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _out, err = run_main(monkeypatch, capsys, "compare", "--out", str(blocker / "sub"))
    assert code == 2 and "--out=" in err and "is not a directory" in err


def test_version(monkeypatch, capsys):
    code, out, _err = run_main(monkeypatch, capsys, "--version")
    assert code == 0 and out.startswith("thpcow ")


def test_a_run_where_every_policy_ran_out_of_memory_fails(monkeypatch, capsys, tmp_path):
    sc = tmp_path / "oom.yaml"
    sc.write_text("name: oom\nram_mib: 64\nsysfs: {enabled: madvise}\n"
                  "workload: {name: copy-after-fork, size_mib: 40, copy_mib: 40, range_kib: 2048}\n"
                  "policies: [upstream]\n")
    code, out, err = run_main(monkeypatch, capsys, "compare", str(sc), "--out", str(tmp_path / "o"))
    assert code == 1
    assert "every policy ran out of memory" in err and "no verdict" in err
    assert "verdict:" not in out
    assert os.path.exists(tmp_path / "o" / "summary.parquet")   # what ran is kept


@pytest.mark.skipif(os.geteuid() != 0, reason="inspect needs root for PFNs")
def test_inspect_json_of_this_process(monkeypatch, capsys):
    import json
    code, out, _err = run_main(monkeypatch, capsys, "inspect", str(os.getpid()), "--json")
    assert code == 0
    [proc] = json.loads(out)
    assert proc["pid"] == os.getpid() and proc["vmas"] and proc["total"]["anon_kb"] > 0


def test_a_trace_with_advice_the_simulator_does_not_model_is_refused(monkeypatch, capsys, tmp_path):
    from thpcow.kernel import madvise
    monkeypatch.setattr(madvise, "_LATER_ADVICE", (102,))   # as if MADV_GUARD_INSTALL were not modelled
    csv = tmp_path / "g.csv"
    csv.write_text("time_ns,pid,op,address,length,arg\n0,1,mmap,0x200000,2097152,\n"
                   "10,1,madvise,0x200000,4096,guard_install\n")
    sc = tmp_path / "g.yaml"
    sc.write_text(f"name: g\nworkload: {{name: trace, path: {csv}}}\n")
    code, _out, err = run_main(monkeypatch, capsys, "compare", str(sc), "--out", str(tmp_path / "o"))
    assert code == 2 and "row 2: madvise arg='guard_install': the simulator does not model this advice yet" in err
