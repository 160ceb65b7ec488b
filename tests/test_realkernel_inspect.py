"""thpcow inspect on a process of known layout, on the running kernel.

This test process maps regions it arranges itself (its own VMAs, so nothing
else on the machine moves the figures):

- A: 8 MiB, MADV_HUGEPAGE, written: four PMD-mapped THPs;
- B: one THP whose PMD was split (mprotect of one page to read-only and back:
  cow.c's THP_RUN_PTE), the folio left whole: a 2 MiB folio mapped by PTEs,
  aligned;
- C: the same, then MADV_DONTNEED of its upper half: 1 MiB of a 2 MiB folio,
  partial;
- E: a THP moved by mremap() to an address that is not 2 MiB aligned: the
  whole folio mapped by PTEs, unaligned;
- M: (only where an mTHP size is enabled) a region faulted as mTHPs.

B and C are then marked MADV_NOHUGEPAGE so that khugepaged cannot collapse
them again while the test looks.  Skips with the reason where THP, root
(PFNs) or a THP allocation is missing.
"""

from __future__ import annotations

import ctypes
import os
import sys

import pytest

from thpcow.lab import procfs
from thpcow.lab.inspect import InspectError, inspect_pid

M = 2 << 20
PAGE = 4096
MADV_DONTNEED, MADV_HUGEPAGE, MADV_NOHUGEPAGE = 4, 14, 15
PROT_READ, PROT_RW = 1, 3

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc only")


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mremap.restype = ctypes.c_void_p
    libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    return libc


def _vma_at(result, addr: int):
    return next(v for v in result.vmas if v.start <= addr < v.end)


@pytest.fixture
def layout():
    ok, why = procfs.thp_available()
    if not ok:
        pytest.skip(why)
    if os.geteuid() != 0:
        pytest.skip("inspect reads PFNs from pagemap: needs root")
    libc = _libc()
    raw = libc.mmap(None, 40 * M, PROT_RW, 0x22, -1, 0)
    assert raw not in (None, ctypes.c_void_p(-1).value)
    base = (raw + M - 1) & ~(M - 1)
    A, B, C, E = base, base + 4 * M, base + 6 * M, base + 10 * M
    libc.mprotect(base + 8 * M, 2 * M, PROT_READ)           # a gap of other flags between C and E
    libc.madvise(A, 8 * M, MADV_HUGEPAGE)
    libc.madvise(E, M, MADV_HUGEPAGE)
    ctypes.memset(A, 1, 4 * M)
    for r in (B, C):
        ctypes.memset(r, 1, M)
        libc.mprotect(r + PAGE, PAGE, PROT_READ)
        libc.mprotect(r + PAGE, PAGE, PROT_RW)
    libc.madvise(C + M // 2, M // 2, MADV_DONTNEED)
    # khugepaged must not collapse B or C again while the test looks: VM_NOHUGEPAGE on them
    # (a VMA boundary at a 2 MiB boundary: no PMD or folio is touched).
    libc.madvise(B, 4 * M, MADV_NOHUGEPAGE)
    ctypes.memset(E, 1, M)
    e_thp = procfs.smaps_field_in_range(procfs.read_smaps("self"), E, E + M, "AnonHugePages")
    dst = base + 20 * M + 3 * PAGE
    got = libc.mremap(E, M, M, 3, dst)                       # MREMAP_MAYMOVE | MREMAP_FIXED
    assert got == dst
    a_thp = procfs.smaps_field_in_range(procfs.read_smaps("self"), A, A + 4 * M, "AnonHugePages")

    def release() -> None:
        # Not munmap(raw, 40 MiB): the hole the mremap() left at E is free address space, and this
        # process (pytest, NumPy, glibc) may have mapped something there since; unmapping that
        # crashed the worker once (SIGSEGV at the teardown).
        libc.munmap(raw, E - raw)
        libc.munmap(E + M, raw + 40 * M - (E + M))

    if a_thp != 8192 or e_thp != 2048:
        release()
        pytest.skip(f"the kernel did not give this test its THPs (AnonHugePages {a_thp} and {e_thp} kB): "
                    "memory too fragmented?")
    yield {"A": A, "B": B, "C": C, "E": dst}
    release()


def test_inspect_reports_a_known_layout_exactly(layout):
    r = inspect_pid(os.getpid())
    a = _vma_at(r, layout["A"])
    assert (a.start, a.end) == (layout["A"], layout["A"] + 4 * M)
    assert a.pmd_kb == 8192 and a.pte == {} and a.small_kb == 0 and a.anon_kb == 8192   # 4 PMD-mapped THPs
    bc = _vma_at(r, layout["B"])
    assert (bc.start, bc.end) == (layout["B"], layout["B"] + 4 * M)                   # B, a gap, C
    assert bc.pmd_kb == 0
    assert bc.pte == {2048: {"aligned": 2048, "unaligned": 0, "partial": 1024}}   # B whole, C half
    assert bc.small_kb == 0 and bc.swap_kb == 0 and bc.anon_kb == 2048 + 1024
    e = _vma_at(r, layout["E"])
    assert (e.start, e.end) == (layout["E"], layout["E"] + M)
    assert e.pmd_kb == 0 and e.pte == {2048: {"aligned": 0, "unaligned": 2048, "partial": 0}}
    total = r.total()
    assert total.pmd_kb >= 8192 and total.pte[2048]["unaligned"] >= 2048
    assert r.to_dict()["total"]["pmd_kb"] == total.pmd_kb


def test_inspect_sees_an_mthp_size_where_one_is_enabled():
    """A region faulted as mTHPs reports that folio size, aligned (needs an mTHP size enabled
    for MADV_HUGEPAGE regions; the lab does not change sysfs to get one)."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    base = os.path.join("/sys/kernel/mm/transparent_hugepage")
    sizes = []
    for d in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        if d.startswith("hugepages-") and d != "hugepages-2048kB" \
                and os.path.isfile(os.path.join(base, d, "enabled")):
            val = procfs.knob_value(open(os.path.join(base, d, "enabled")).read())
            glob = procfs.knob_value(open(os.path.join(base, "enabled")).read())
            if val in ("always", "madvise") or (val == "inherit" and glob in ("always", "madvise")):
                sizes.append(int(d[len("hugepages-"):-2]))
    if not sizes:
        pytest.skip("no mTHP size is enabled on this machine (hugepages-<N>kB/enabled are [never]; "
                    "the lab does not write sysfs)")
    kb = max(sizes)
    libc = _libc()
    raw = libc.mmap(None, 4 * M, PROT_RW, 0x22, -1, 0)
    try:
        base_addr = (raw + M - 1) & ~(M - 1)
        libc.madvise(base_addr, M, MADV_HUGEPAGE)
        for off in range(0, M // 2, kb * 1024):               # one store per mTHP block, half the region
            ctypes.memset(base_addr + off, 1, 1)
        v = _vma_at(inspect_pid(os.getpid()), base_addr)
        assert v.pte.get(kb, {}).get("aligned", 0) > 0, v.pte
    finally:
        libc.munmap(raw, 4 * M)


def test_a_process_that_has_gone_is_a_clear_error():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    with pytest.raises(InspectError, match=f"pid {pid}: no such process"):
        inspect_pid(pid)
