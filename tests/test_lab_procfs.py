"""Unit tests for thpcow.lab.procfs: parsers on golden text, pagemap/kpageflags decoding on
synthetic data, and the readers on fake /proc and /sys trees under tmp_path.

No real kernel is needed. If a golden sample changes on purpose, update the expected
values below together with it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

from thpcow.lab import procfs
from thpcow.lab.procfs import (
    KPF_ANON, KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL, KPF_THP, KPF_ZERO_PAGE, LabError,
    PM_FILE, PM_MMAP_EXCLUSIVE, PM_PFRAME_MASK, PM_PRESENT, PM_SOFT_DIRTY, PM_SWAP,
    PM_UFFD_WP, PM_GUARD_REGION,
)

# Two VMAs as 6.18 prints them: a file mapping, then an anonymous MADV_HUGEPAGE region
# with two PMD-mapped THPs (4 MiB) after fork (Pss halved, Shared_Dirty).
SMAPS_GOLDEN = """\
55d1c2a00000-55d1c2a02000 r--p 00000000 fe:00 260386                     /usr/bin/python3.11
Size:                  8 kB
KernelPageSize:        4 kB
MMUPageSize:           4 kB
Rss:                   8 kB
Pss:                   8 kB
Pss_Dirty:             0 kB
Shared_Clean:          0 kB
Shared_Dirty:          0 kB
Private_Clean:         8 kB
Private_Dirty:         0 kB
Referenced:            8 kB
Anonymous:             0 kB
KSM:                   0 kB
LazyFree:              0 kB
AnonHugePages:         0 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
Swap:                  0 kB
SwapPss:               0 kB
Locked:                0 kB
THPeligible:           0
VmFlags: rd mr mw me 
7f3a1c400000-7f3a1c800000 rw-p 00000000 00:00 0 
Size:               4096 kB
KernelPageSize:        4 kB
MMUPageSize:           4 kB
Rss:                4096 kB
Pss:                2048 kB
Pss_Dirty:          2048 kB
Shared_Clean:          0 kB
Shared_Dirty:       4096 kB
Private_Clean:         0 kB
Private_Dirty:         0 kB
Referenced:         4096 kB
Anonymous:          4096 kB
KSM:                   0 kB
LazyFree:              0 kB
AnonHugePages:      4096 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
Swap:                  0 kB
SwapPss:               0 kB
Locked:                0 kB
ProtectionKey:         0
THPeligible:           1
VmFlags: rd wr mr mw me ac hg 
"""

SMAPS_ROLLUP_GOLDEN = """\
5594c8025000-7fffc3355000 ---p 00000000 00:00 0                          [rollup]
Rss:                5812 kB
Pss:                3765 kB
Pss_Dirty:          2160 kB
Pss_Anon:           2160 kB
Pss_File:           1605 kB
Pss_Shmem:             0 kB
Shared_Clean:       1540 kB
Shared_Dirty:       4096 kB
Private_Clean:        64 kB
Private_Dirty:       112 kB
Referenced:         5812 kB
Anonymous:          4208 kB
KSM:                   0 kB
LazyFree:              0 kB
AnonHugePages:      4096 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
Swap:                  0 kB
SwapPss:               0 kB
Locked:                0 kB
"""


def _write(root: Path, rel: str, text: str | bytes) -> Path:
    """Create root/rel (and its parents) with ``text``."""
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return p


def _thp_tree(root: Path, enabled: str, pmd: str | None = "inherit",
              others: str = "never") -> Path:
    """A fake /sys/kernel/mm/transparent_hugepage with the given selected values.

    ``pmd=None`` omits the hugepages-<N>kB/ directories (kernels before v6.8).
    """
    def choice(values: list[str], sel: str) -> str:
        return " ".join(f"[{v}]" if v == sel else v for v in values) + "\n"

    base = f"{procfs.THP_SYSFS}"
    _write(root, f"{base}/enabled", choice(["always", "madvise", "never"], enabled))
    _write(root, f"{base}/defrag",
           choice(["always", "defer", "defer+madvise", "madvise", "never"], "madvise"))
    _write(root, f"{base}/use_zero_page", "1\n")
    _write(root, f"{base}/hpage_pmd_size", "2097152\n")
    _write(root, f"{base}/khugepaged/max_ptes_none", "511\n")
    _write(root, f"{base}/khugepaged/pages_to_scan", "4096\n")
    if pmd is not None:
        per_size = ["always", "inherit", "madvise", "never"]
        _write(root, f"{base}/hugepages-2048kB/enabled", choice(per_size, pmd))
        for kb in (16, 64, 1024):
            _write(root, f"{base}/hugepages-{kb}kB/enabled", choice(per_size, others))
        _write(root, f"{base}/hugepages-8kB/shmem_enabled", "never\n")  # no anon enabled
    return root


# --- smaps -------------------------------------------------------------------------------------

def test_parse_smaps_golden() -> None:
    vmas = procfs.parse_smaps(SMAPS_GOLDEN)
    assert len(vmas) == 2
    f, a = vmas
    assert (f.start, f.end, f.perms, f.offset, f.dev, f.inode) == (
        0x55D1C2A00000, 0x55D1C2A02000, "r--p", 0, "fe:00", 260386)
    assert f.name == "/usr/bin/python3.11"
    assert f.fields["Rss"] == 8 and f.kb("AnonHugePages") == 0
    assert f.thp_eligible == 0
    assert f.vm_flags == ["rd", "mr", "mw", "me"]

    assert a.name == "" and a.inode == 0 and a.dev == "00:00"
    assert a.size == 4 << 20
    assert a.fields["AnonHugePages"] == 4096
    assert a.fields["Pss"] == 2048 and a.fields["Shared_Dirty"] == 4096
    assert a.thp_eligible == 1
    assert "hg" in a.vm_flags and a.vm_flags[-1] == "hg"
    assert a.extra == {"ProtectionKey": "0"}
    assert "ProtectionKey" not in a.fields  # fields holds kB values only
    assert len(a.fields) == 22


def test_parse_smaps_range_helpers() -> None:
    vmas = procfs.parse_smaps(SMAPS_GOLDEN)
    lo = 0x7F3A1C400000
    assert procfs.vmas_in_range(vmas, lo, lo + 4096) == [vmas[1]]
    assert procfs.smaps_field_in_range(vmas, lo, lo + (4 << 20), "AnonHugePages") == 4096
    assert procfs.smaps_field_in_range(vmas, 0, 1 << 47, "Rss") == 4104
    assert procfs.vmas_in_range(vmas, lo + (4 << 20), lo + (8 << 20)) == []


def test_parse_smaps_name_with_spaces_and_no_thpeligible() -> None:
    text = ("7f0000000000-7f0000001000 rw-s 00001000 00:05 77   /dev/shm/a b (deleted)\n"
            "Rss:                   4 kB\n")
    (v,) = procfs.parse_smaps(text)
    assert v.name == "/dev/shm/a b (deleted)" and v.offset == 0x1000
    assert v.thp_eligible is None and v.vm_flags == []


def test_parse_smaps_errors_name_the_source() -> None:
    with pytest.raises(LabError, match=r"^/proc/42/smaps:1: field line before"):
        procfs.parse_smaps("Rss: 4 kB\n", source="/proc/42/smaps")
    bad = SMAPS_GOLDEN.replace("THPeligible:           1", "THPeligible:           x")
    with pytest.raises(LabError, match=r"smaps:\d+: THPeligible is not an integer"):
        procfs.parse_smaps(bad)
    with pytest.raises(LabError, match=r"smaps:2: cannot parse"):
        procfs.parse_smaps("7f0000000000-7f0000001000 rw-p 00000000 00:00 0\n?? junk\n")


def test_read_smaps_fake_root(tmp_path: Path) -> None:
    _write(tmp_path, "proc/1234/smaps", SMAPS_GOLDEN)
    vmas = procfs.read_smaps(1234, root=str(tmp_path))
    assert [v.kb("AnonHugePages") for v in vmas] == [0, 4096]
    with pytest.raises(LabError, match=r"proc/999/smaps: no such file"):
        procfs.read_smaps(999, root=str(tmp_path))


def test_parse_smaps_rollup_golden(tmp_path: Path) -> None:
    r = procfs.parse_smaps_rollup(SMAPS_ROLLUP_GOLDEN)
    assert r["Rss"] == 5812 and r["Pss_Anon"] == 2160 and r["AnonHugePages"] == 4096
    assert len(r) == 22
    _write(tmp_path, "proc/self/smaps_rollup", SMAPS_ROLLUP_GOLDEN)
    assert procfs.read_smaps_rollup("self", root=str(tmp_path)) == r
    with pytest.raises(LabError, match=r"smaps_rollup:2: expected"):
        procfs.parse_smaps_rollup(SMAPS_ROLLUP_GOLDEN.replace("Rss:                5812 kB",
                                                              "Rss: lots"))


# --- vmstat ------------------------------------------------------------------------------------

def test_read_vmstat_fake_root(tmp_path: Path) -> None:
    _write(tmp_path, "proc/vmstat",
           "nr_free_pages 123456\npgfault 714221\nthp_fault_alloc 4\nthp_split_pmd 0\n")
    vm = procfs.read_vmstat(root=str(tmp_path))
    assert vm == {"nr_free_pages": 123456, "pgfault": 714221, "thp_fault_alloc": 4,
                  "thp_split_pmd": 0}


def test_read_vmstat_errors(tmp_path: Path) -> None:
    with pytest.raises(LabError, match=r"proc/vmstat: no such file"):
        procfs.read_vmstat(root=str(tmp_path))
    _write(tmp_path, "proc/vmstat", "pgfault 1\nthp_fault_alloc four\n")
    with pytest.raises(LabError, match=r"proc/vmstat:2: value of thp_fault_alloc"):
        procfs.read_vmstat(root=str(tmp_path))


# --- THP knobs ---------------------------------------------------------------------------------

def test_knob_value() -> None:
    assert procfs.knob_value("always [madvise] never\n") == "madvise"
    assert procfs.knob_value("always defer [defer+madvise] madvise never") == "defer+madvise"
    assert procfs.knob_value("511\n") == "511"


def test_read_thp_knobs(tmp_path: Path) -> None:
    _thp_tree(tmp_path, "madvise")
    knobs = procfs.read_thp_knobs(root=str(tmp_path))
    assert knobs == {
        "enabled": "madvise", "defrag": "madvise", "use_zero_page": "1",
        "hpage_pmd_size": "2097152",
        "khugepaged/max_ptes_none": "511", "khugepaged/pages_to_scan": "4096",
        "hugepages-16kB/enabled": "never", "hugepages-64kB/enabled": "never",
        "hugepages-1024kB/enabled": "never", "hugepages-2048kB/enabled": "inherit",
    }
    assert list(knobs)[-4:] == ["hugepages-16kB/enabled", "hugepages-64kB/enabled",
                                "hugepages-1024kB/enabled", "hugepages-2048kB/enabled"]
    assert procfs.read_thp_knobs(root=str(tmp_path / "empty")) == {}


@pytest.mark.parametrize("enabled, pmd, ok, reason_re", [
    ("madvise", "inherit", True, None),
    ("always", "inherit", True, None),
    ("never", "inherit", False, r"enabled is \[never\] and hugepages-2048kB/enabled is "
                                r"\[inherit\]"),
    ("madvise", "never", False, r"hugepages-2048kB/enabled is \[never\]"),
    ("always", "never", False, r"hugepages-2048kB/enabled is \[never\]"),
    ("never", "madvise", True, None),
    ("never", "always", True, None),
    ("madvise", None, True, None),      # before v6.8: no per-size dirs, PMD follows global
    ("never", None, False, r"enabled is \[never\]"),
])
def test_thp_available(tmp_path: Path, enabled: str, pmd: str | None, ok: bool,
                       reason_re: str | None) -> None:
    _thp_tree(tmp_path, enabled, pmd)
    got, reason = procfs.thp_available(root=str(tmp_path))
    assert got is ok
    if ok:
        assert reason == ""
    else:
        assert reason_re is not None and re.search(reason_re, reason), reason


def test_thp_available_no_thp(tmp_path: Path) -> None:
    ok, reason = procfs.thp_available(root=str(tmp_path))
    assert not ok
    assert "transparent_hugepage/enabled does not exist" in reason
    assert "CONFIG_TRANSPARENT_HUGEPAGE" in reason


# --- pagemap -----------------------------------------------------------------------------------

def test_pagemap_bits_match_kernel() -> None:
    assert PM_PFRAME_MASK == (1 << 55) - 1
    assert [PM_SOFT_DIRTY, PM_MMAP_EXCLUSIVE, PM_UFFD_WP, PM_GUARD_REGION, PM_FILE, PM_SWAP,
            PM_PRESENT] == [1 << b for b in (55, 56, 57, 58, 61, 62, 63)]


def test_pagemap_decoding_synthetic() -> None:
    e = np.array([
        PM_PRESENT | PM_MMAP_EXCLUSIVE | 0x12345,            # exclusive anon page
        PM_PRESENT | 0x12346,                                 # shared after fork
        PM_PRESENT | PM_FILE | 0x1,                           # file page
        PM_SWAP | (7 << 5) | 1,                               # swap entry: not a PFN
        0,                                                    # never touched
        PM_PRESENT | PM_SOFT_DIRTY | PM_UFFD_WP | PM_PFRAME_MASK,
    ], dtype=np.uint64)
    assert procfs.pagemap_pfn(e).tolist() == [0x12345, 0x12346, 1, 0, 0, PM_PFRAME_MASK]
    assert procfs.pagemap_flag(e, PM_PRESENT).tolist() == [True, True, True, False, False, True]
    assert procfs.pagemap_flag(e, PM_MMAP_EXCLUSIVE).tolist() == [True] + [False] * 5
    assert procfs.pagemap_flag(e, PM_FILE).tolist() == [False, False, True, False, False, False]
    assert procfs.pagemap_flag(e, PM_SWAP).tolist() == [False, False, False, True, False, False]
    assert procfs.pagemap_flag(e, PM_UFFD_WP)[-1] and procfs.pagemap_flag(e, PM_SOFT_DIRTY)[-1]


def test_read_pagemap_fake_root(tmp_path: Path) -> None:
    ps = procfs.PAGE_SIZE
    table = np.arange(64, dtype=np.uint64) | np.uint64(PM_PRESENT)
    _write(tmp_path, "proc/77/pagemap", table.tobytes())
    got = procfs.read_pagemap(77, 10 * ps, 5, root=str(tmp_path))
    assert got.dtype == np.uint64
    assert procfs.pagemap_pfn(got).tolist() == [10, 11, 12, 13, 14]
    assert procfs.read_pagemap(77, 0, 0, root=str(tmp_path)).size == 0
    with pytest.raises(ValueError, match="not page aligned"):
        procfs.read_pagemap(77, 10 * ps + 1, 1, root=str(tmp_path))
    with pytest.raises(LabError, match=r"proc/77/pagemap: short read: got 16 of 40 bytes"):
        procfs.read_pagemap(77, 62 * ps, 5, root=str(tmp_path))
    with pytest.raises(LabError, match=r"proc/78/pagemap: no such file"):
        procfs.read_pagemap(78, 0, 1, root=str(tmp_path))


# --- kpageflags / kpagecount -------------------------------------------------------------------

def test_kpf_bits_match_uapi() -> None:
    assert (procfs.KPF_LOCKED, KPF_ANON, KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL, KPF_THP,
            KPF_ZERO_PAGE, procfs.KPF_PGTABLE) == (0, 12, 15, 16, 22, 24, 26)
    assert procfs.KPF_NAMES[22] == "THP" and procfs.KPF_NAMES[17] == "HUGE"


def test_read_kpageflags_fake_root(tmp_path: Path) -> None:
    # A fake THP at pfn 512..1023: head + 511 tails; pfn 7 is the zero page.
    flags = np.zeros(2048, dtype=np.uint64)
    thp = (1 << KPF_THP) | (1 << KPF_ANON)
    flags[512] = thp | (1 << KPF_COMPOUND_HEAD)
    flags[513:1024] = thp | (1 << KPF_COMPOUND_TAIL)
    flags[7] = 1 << KPF_ZERO_PAGE
    counts = np.zeros(2048, dtype=np.uint64)
    counts[512:1024] = 2
    _write(tmp_path, "proc/kpageflags", flags.tobytes())
    _write(tmp_path, "proc/kpagecount", counts.tobytes())
    root = str(tmp_path)

    pfns = np.array([1023, 512, 7, 513, 513, 2000], dtype=np.uint64)  # unsorted, repeated
    got = procfs.read_kpageflags(pfns, root=root)
    assert got.tolist() == flags[pfns.astype(np.int64)].tolist()
    assert procfs.kpf_test(got, KPF_THP).tolist() == [True, True, False, True, True, False]
    assert procfs.kpf_test(got, KPF_COMPOUND_HEAD).tolist() == [False, True] + [False] * 4
    assert procfs.kpf_names(got[1]) == ["ANON", "COMPOUND_HEAD", "THP"]
    assert procfs.kpf_names(got[2]) == ["ZERO_PAGE"]
    assert procfs.read_kpagecount(range(510, 515), root=root).tolist() == [0, 0, 2, 2, 2]
    assert procfs.read_kpageflags([], root=root).size == 0
    with pytest.raises(LabError, match=r"proc/kpageflags: short read"):
        procfs.read_kpageflags([2047, 2048], root=root)


def test_cont_ranges() -> None:
    a = np.array([1, 2, 3, 7, 9, 10], dtype=np.uint64)
    assert procfs.cont_ranges(a) == [(0, 3), (3, 4), (4, 6)]
    assert procfs.cont_ranges(np.array([], dtype=np.uint64)) == []


# --- metadata ----------------------------------------------------------------------------------

def test_read_metadata_fake_root(tmp_path: Path) -> None:
    _write(tmp_path, "proc/sys/kernel/osrelease", "6.18.44-test\n")
    _write(tmp_path, "proc/cmdline", "quiet transparent_hugepage=madvise\n")
    _write(tmp_path, "proc/cpuinfo", "processor\t: 0\nmodel name\t: Test CPU\n")
    md = procfs.read_metadata(root=str(tmp_path))
    assert md["kernel"] == "6.18.44-test"
    assert md["cmdline"] == "quiet transparent_hugepage=madvise"
    assert md["cpu_model"] == "Test CPU"
    assert md["governor"] == "n/a"  # no cpufreq in the fake tree (nor in most VMs)
    assert int(md["nr_cpus"]) == (os.cpu_count() or 0)


def test_a_noise_floor_is_settled_when_the_quietest_score_comes_up_twice():
    from thpcow.lab.scenario import settled
    assert not settled([]) and not settled([(4, 10)])
    assert settled([(4, 10), (6, 3), (4, 99)])          # 4 twice: the scenario's own events
    assert not settled([(5, 1), (4, 2), (6, 0)])        # every run disturbed differently
