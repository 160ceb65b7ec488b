"""Costs that match the machine: per-PTE fork pricing, the dense-overwrite COW, cost presets with
their sources, and which profile a run picks (cached for this CPU and kernel, a CPU preset, the
reference), with the line that says so."""

from __future__ import annotations

import sys

import pytest

from thpcow.experiments.costs import MachineLatencyModel, profile_warning, resolve_profile
from thpcow.lab import calibrate as cal
from thpcow.lab import validate as val
from thpcow.machine import cost_presets as cp
from thpcow.machine.latency import DEFAULT_PROFILE, CalibrationProfile, cost_vmstat_delta, fork_hints

MiB = 1 << 20
PMD = 2 * MiB


# -- fork: a PTE table plus its present entries -----------------------------------------------------
def test_fork_of_sparse_tables_costs_their_entries_not_512_each():
    """One page per 2 MiB: 4 PTE tables of one entry.  The old model priced 4 full tables (137 us)."""
    from thpcow.kernel import MADV_NOHUGEPAGE, Kernel

    k = Kernel(ram=1 << 30, seed=0)
    p = k.spawn()
    a = (p.mmap(8 * MiB + PMD) + PMD - 1) & ~(PMD - 1)
    p.madvise(a, 8 * MiB, MADV_NOHUGEPAGE)
    for i in range(4):
        p.write(a + i * PMD, 1, token=1)
    hints = fork_hints(p)
    assert hints["fork_pte_tables"] == 4 and hints["fork_ptes"] == 4
    sparse = cost_vmstat_delta({}, DEFAULT_PROFILE, hints)
    assert sparse.events["fork_pte"] == 4
    assert sparse.parts_ns["fork_pte"] + sparse.parts_ns["fork_pte_table"] == pytest.approx(4 * 67.0)
    p.write_many(list(range(a, a + 8 * MiB, 4096)), 2)          # now full: 2048 entries
    full = cost_vmstat_delta({}, DEFAULT_PROFILE, fork_hints(p))
    assert full.events["fork_pte"] == 2048
    assert full.parts_ns["fork_pte"] == pytest.approx(4 * 34_304)          # calibration.md: 67 ns per PTE


def test_fork_without_a_ptes_hint_counts_full_tables_and_the_runner_adapter_passes_ptes():
    prof = CalibrationProfile(fork_pte_ns=20.0, fork_pte_table_ns=1500.0, exit_pte_ns=30.0, exit_pte_table_ns=900.0)
    c = cost_vmstat_delta({}, prof, {"forks": 0, "fork_pte_tables": 3})
    assert c.total_ns == pytest.approx(3 * (1500 + 512 * 20))
    m = MachineLatencyModel(prof)
    assert m.op_cost_ns("fork", {}, pte_tables=3, ptes=10) == pytest.approx(prof.fork_base_ns + 3 * 1500 + 10 * 20)
    assert m.op_cost_ns("exit", {}, pte_tables=2) == pytest.approx(2 * (900 + 512 * 30))
    assert m.op_cost_ns("exit", {}, pte_tables=2, ptes=1) == pytest.approx(2 * 900 + 30)


def test_a_profile_file_from_before_the_per_pte_fields_keeps_its_price(tmp_path):
    old = tmp_path / "old.toml"
    old.write_text('name = "old"\nfork_pte_table_ns = 51200.0\nexit_pte_table_ns = 25600.0\n')
    p = CalibrationProfile.load(old)
    assert p.fork_pte_ns == 100.0 and p.fork_pte_table_ns == 0.0
    assert p.exit_pte_ns == 50.0 and p.exit_pte_table_ns == 0.0
    assert cost_vmstat_delta({}, p, {"fork_pte_tables": 2}).total_ns == pytest.approx(2 * 51_200)


# -- the dense rewrite ------------------------------------------------------------------------------
def test_dense_cow_hint_adds_its_extra_per_cow_fault_only():
    d = {"pgfault": 10, "sim_cow_pages": 10, "sim_cow_bytes": 10 * 4096}
    plain = cost_vmstat_delta(d, DEFAULT_PROFILE)
    dense = cost_vmstat_delta(d, DEFAULT_PROFILE, {"dense_cow_pages": 10})
    assert dense.total_ns - plain.total_ns == pytest.approx(10 * DEFAULT_PROFILE.cow_dense_4k_ns)
    capped = cost_vmstat_delta(d, DEFAULT_PROFILE, {"dense_cow_pages": 50})      # no more than the COW faults
    assert capped.events["cow_dense_4k"] == 10


def test_reference_rewrite_after_fork_matches_calibration_md():
    """calibration.md 3c: the parent memsets a fork-shared 4 KiB-backed region, 1,453 us per 2 MiB
    (THP-backed: 1,512).  The model before the dense-overwrite term gave 998 us (memset + 512 COWs)."""
    extras = cal.lab_extras({})
    four_k = val.predict_rewrite(8 * MiB, "4k", DEFAULT_PROFILE, extras).ns / 4
    thp = val.predict_rewrite(8 * MiB, "thp", DEFAULT_PROFILE, extras).ns / 4
    assert four_k == pytest.approx(1_453e3, rel=0.01)
    assert thp == pytest.approx(1_512e3, rel=0.05)


# -- presets ----------------------------------------------------------------------------------------
def test_presets_name_their_sources_and_carry_the_published_bandwidths():
    for name, p in cp.PRESETS.items():
        assert p.name == name and p.source and p.kernel
    base, new = cp.PRESETS["amd-genoa-v6.18"], cp.PRESETS["amd-genoa-v7.0-clear-pages"]
    assert "11.76 -> 23.58 GB/s" in base.source and "Genoa" in base.source and "assumption" in base.source
    rest = cp._THP_FAULT_REST_NS
    assert (base.fault_thp_zero_ns - rest) / (new.fault_thp_zero_ns - rest) == pytest.approx(23.58 / 11.76)
    assert new.fault_thp_zero_ns - rest == pytest.approx(2 * MiB / 23.58)          # ns at GB/s
    z5, z5b = cp.PRESETS["amd-zen5-turin"], cp.PRESETS["amd-zen5-turin-batched-copy"]
    assert "18.65 -> 38.03 GB/s" in z5b.source and "Zen 5" in z5b.source
    assert z5.copy_2m_ns == pytest.approx(2 * MiB / 18.65) and z5b.copy_2m_ns == pytest.approx(2 * MiB / 38.03)
    assert z5.fault_thp_zero_ns == DEFAULT_PROFILE.fault_thp_zero_ns               # not in the source
    with pytest.raises(cp.ProfileChoiceError, match="presets: lab-vm-zen4-warm"):
        cp.preset("nope")


def test_resolve_profile_takes_files_presets_and_auto(tmp_path, monkeypatch):
    monkeypatch.setenv("THPCOW_PROFILE_CACHE", "off")
    prof, lab, choice = resolve_profile("amd-zen5-turin")
    assert prof is cp.PRESETS["amd-zen5-turin"] and lab == {} and choice.how == "preset"
    f = DEFAULT_PROFILE.save(tmp_path / "p.toml")
    assert resolve_profile(str(f))[2].how == "file"
    assert resolve_profile(None)[2].how == "reference"
    assert resolve_profile("auto")[2].how in ("reference", "cpu-preset")
    with pytest.raises(ValueError, match="--profile=zz: no such profile file or preset"):
        resolve_profile("zz")


# -- which profile a run uses -------------------------------------------------------------------------
def test_selection_cached_then_cpu_preset_then_reference(tmp_path, monkeypatch):
    monkeypatch.setenv("THPCOW_PROFILE_CACHE", str(tmp_path))
    other = cp.select(cpu_id="GenuineIntel:6:1", kernel="6.18.1")
    assert other.how == "reference" and other.profile is DEFAULT_PROFILE
    assert "run `thpcow calibrate`" in other.line()
    assert cp.select(cpu_id="GenuineIntel:6:207", kernel="6.18.1").profile.name == "intel-xeon-6-207-kvm"
    zen5 = cp.select(cpu_id="AuthenticAMD:26:2", kernel="6.18.1")
    assert zen5.how == "cpu-preset" and zen5.profile.name == "amd-zen5-turin"
    assert "matches this CPU" in zen5.line()
    path = cp.cache_path("GenuineIntel:6:207", "6.18.1")
    assert path.parent == tmp_path and path.name == "GenuineIntel_6_207--6.18.1.toml"
    mine = CalibrationProfile(name="mine", cpu_id="GenuineIntel:6:207", kernel="6.18.1", fault_4k_zero_ns=999.0)
    cal.write_profile(mine, path, {"format": 1, "metadata": {"kernel": "6.18.1"}})
    got = cp.select(cpu_id="GenuineIntel:6:207", kernel="6.18.1")
    assert got.how == "cached" and got.profile.fault_4k_zero_ns == 999.0 and str(path) in got.line()
    assert cp.select(cpu_id="GenuineIntel:6:207", kernel="6.19.0").how == "cpu-preset"   # keyed by kernel
    path.write_text("fault_4k_zero_ns = -1\n")                                           # broken: ignored
    assert cp.select(cpu_id="GenuineIntel:6:207", kernel="6.18.1").how == "cpu-preset"
    monkeypatch.setenv("THPCOW_PROFILE_CACHE", "off")
    assert cp.cache_dir() is None and cp.cache_path("x", "y") is None


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("THPCOW_PROFILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cp.cache_dir() == tmp_path / "thpcow"


def test_mismatch_names_the_cpu_and_the_kernel():
    p = CalibrationProfile(name="x", cpu_id="AuthenticAMD:25:17", kernel="6.18.44")
    assert cp.mismatch(p, cpu_id="AuthenticAMD:25:17", kernel="6.18.44") is None
    w = cp.mismatch(p, cpu_id="GenuineIntel:6:207", kernel="7.0.1")
    assert "CPU AuthenticAMD:25:17 (this one: GenuineIntel:6:207)" in w and "kernel 6.18.44 (this one: 7.0.1)" in w
    assert cp.mismatch(CalibrationProfile(cpu_id="", kernel=""), cpu_id="a:b:c", kernel="k") is None
    assert profile_warning(MachineLatencyModel(p)) in (None, cp.mismatch(p))


def test_host_cpu_id_reads_the_first_processor(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 207\n"
                 "model name\t: Intel(R) Xeon(R)\n\nprocessor\t: 1\nvendor_id\t: Other\n")
    assert cp.host_cpu_id(str(f)) == "GenuineIntel:6:207"
    assert cp.host_cpu_id(str(tmp_path / "none")) == ""
    assert cal.cpu_id_of({"cpu_vendor": "GenuineIntel", "cpu_family": "6", "cpu_model_number": "207"}) \
        == "GenuineIntel:6:207"


# -- calibrate derives the per-PTE and dense figures -------------------------------------------------
def test_calibrator_derives_fork_pte_table_and_dense_extra_run_by_run():
    c = cal.Calibrator(cal.CalibrationConfig.quick_config())
    for full, sparse in ((15_000.0, 2_000.0), (16_022.0, 2_000.0), (14_000.0, 1_500.0)):
        c.record("fork_4k", full * 512, 512, {}, rules="none")
        c.record("fork_4k_sparse", sparse * 512, 512, {}, rules="none")
    for cow, dense in ((2_000.0, 2_500.0), (2_100.0, 2_500.0), (2_000.0, 2_400.0)):
        c.record("cow_4k", cow, 1, {}, rules="none")
        c.record("cow_dense", dense, 1, {}, rules="none")
    c.kernel, c.cpu_id = "6.18.1", "GenuineIntel:6:207"
    p = c.profile("t", "t")
    assert p.fork_pte_table_ns == 2_000.0
    assert p.fork_pte_ns == pytest.approx(13_000.0 / 511, rel=1e-3)       # median of run-by-run (full - sparse)/511
    assert p.cow_dense_4k_ns == pytest.approx(400.0)
    assert (p.kernel, p.cpu_id) == ("6.18.1", "GenuineIntel:6:207")


# -- CLI ---------------------------------------------------------------------------------------------
def _main(monkeypatch, capsys, *args):
    from thpcow.cli import main

    monkeypatch.setattr(sys, "argv", ["thpcow", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_calibrate_lists_the_presets_with_sources_in_80_columns(monkeypatch, capsys):
    code, out, err = _main(monkeypatch, capsys, "calibrate", "--list-presets")
    assert code == 0, err
    for name in cp.PRESETS:
        assert name in out
    assert "23.58 GB/s" in out and "38.03 GB/s" in out
    table = out.split("lab-vm-zen4-warm:")[0]
    assert max(len(ln) for ln in table.splitlines()) <= 80


@pytest.mark.parametrize("args, line", [
    (["validate", "--profile", "nosuch"], "thpcow: --profile=nosuch: no such profile file or preset"),
    (["validate", "--calibrate", "--profile", "amd-zen5-turin"], "thpcow: --calibrate: cannot be combined"),
    (["validate", "--programs", "3", "--calibrate"], "thpcow: --programs: cannot be combined"),
])
def test_validate_bad_profile_is_one_line_exit_2(monkeypatch, capsys, args, line):
    code, out, err = _main(monkeypatch, capsys, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and line in err, err
    assert "Traceback" not in out + err


def test_lab_timings_are_this_threads_cpu_time():
    """A sleep takes wall time but no CPU time: other tasks holding the CPU do not inflate a figure."""
    import time

    assert cal.timed_ns(lambda: time.sleep(0.05)) < 10e6


@pytest.mark.realkernel
def test_validate_uses_the_cached_profile_and_says_so(monkeypatch, capsys, tmp_path):
    from dataclasses import replace

    from conftest import skip_without_real_thp

    skip_without_real_thp()
    monkeypatch.setenv("THPCOW_PROFILE_CACHE", str(tmp_path))
    monkeypatch.setattr("rich.console.Console.is_terminal", property(lambda self: False))
    mine = replace(DEFAULT_PROFILE, name="cached-here", cpu_id=cp.host_cpu_id(), kernel=cp.host_kernel())
    path = cp.cache_path(mine.cpu_id, mine.kernel)
    cal.write_profile(mine, path)
    code, out, err = _main(monkeypatch, capsys, "validate", "--quick", "--scenario", "first_touch_thp")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"profile: cached-here (this machine's, cached {path})"
    assert any(ln.startswith("│ first touch THP 64 MiB") for ln in lines), out
    assert "band 0.90-1.10" in out
    assert max(len(ln) for ln in lines if ln.startswith(("│", "┃", "┏", "└"))) <= 80


@pytest.mark.realkernel
def test_validate_calibrate_interleaves_caches_and_says_so(monkeypatch, capsys, tmp_path):
    """validate --calibrate with no profile cached (the first use): one line says it fits this
    machine's profile interleaved with the validation, the table's ratios are the rounds'
    medians, the profile is cached (small sizes)."""
    from conftest import skip_without_real_thp

    skip_without_real_thp()
    monkeypatch.setenv("THPCOW_PROFILE_CACHE", str(tmp_path))
    monkeypatch.setattr("rich.console.Console.is_terminal", property(lambda self: False))
    small = dict(size=8 * 2**20, fork_size=32 * 2**20, fork_thp_size=64 * 2**20, random_accesses=200_000)
    cal_quick, val_quick = cal.CalibrationConfig.quick_config, val.ValidationConfig.quick_config
    monkeypatch.setattr(cal.CalibrationConfig, "quick_config", classmethod(lambda cls: cal_quick(
        **small, copy_size=8 * 2**20, zero_read_size=64 * 2**20, random_sizes=(32 * 2**20,), repeats=2,
        fork_repeats=3)))
    monkeypatch.setattr(val.ValidationConfig, "quick_config", classmethod(lambda cls: val_quick(
        **small, random_size=32 * 2**20, repeats=2, fork_repeats=3)))
    code, out, err = _main(monkeypatch, capsys, "validate", "--quick", "--calibrate", "--scenario", "first_touch_thp")
    assert code == 0, err
    lines = out.splitlines()
    path = cp.cache_path(cp.host_cpu_id(), cp.host_kernel())
    assert lines[0].startswith("fitting this machine's profile first (no profile of this machine is cached")
    assert lines[0].endswith("thpcow calibrate --quick, interleaved with the validation")     # the first use
    assert lines[1].startswith("profile: calibrated-") and lines[1].endswith(f"(this machine's, cached {path})")
    assert "median of 2 rounds' ratios" in " ".join(out.split()), out          # the title (wrapped to the table)
    assert any(ln.startswith("│ first touch THP 8 MiB") for ln in lines), out
    assert any(ln.startswith("measured interleaved with the calibration") for ln in lines), out
    assert max(len(ln) for ln in lines if ln.startswith(("│", "┃", "┏", "└"))) <= 80
    assert path.exists() and cal.load_profile(path)[0].name == lines[1].split()[1]


def test_probe_drift_is_now_over_then():
    assert cal.probe_drift({"memset_ns": 100.0, "call_ns": 50.0}, {"memset_ns": 130.0, "call_ns": 50.0}) \
        == {"memset_ns": 1.3, "call_ns": 1.0}
    assert cal.probe_drift(None, {"memset_ns": 1.0}) == {} and cal.probe_drift({"memset_ns": 0.0}, {"memset_ns": 1.0}) == {}
