"""One decision path: the batched store path asks the same fault handlers as the scalar one."""

from __future__ import annotations

import numpy as np
import pytest

from thpcow.kernel import MADV_HUGEPAGE, PAGE_SIZE, Kernel
from thpcow.kernel import huge_memory as hm
from thpcow.kernel import memory


class Called(Exception):
    pass


def _shared_thp(k: Kernel, split: bool):
    p = k.spawn()
    a = p.mmap(4 << 20)
    p.madvise(a, 4 << 20, MADV_HUGEPAGE)
    p.write(a, 4 << 20, 1)
    c = p.fork()
    if split:                                   # the child's PMDs become PTE tables first
        c.write(a, 1, 2)
        c.write(a + (2 << 20), 1, 2)
    return p, c, a


@pytest.mark.parametrize("how", ["write_many", "write_many_scalar"])
@pytest.mark.parametrize("module, handler, split", [(memory, "do_wp_page", True),
                                                    (hm, "do_huge_pmd_wp_pages", False)])
def test_cow_goes_through_the_fault_handler(monkeypatch, how, module, handler, split):
    """Both store paths reach do_wp_page() (PTE COW) and do_huge_pmd_wp_pages() (PMD COW).

    The scalar path's do_huge_pmd_wp_page() hands its one fault to
    do_huge_pmd_wp_pages(); the batched path hands it a round of faults.
    """
    k = Kernel(ram=512 << 20, check=True)
    p, c, a = _shared_thp(k, split=split)
    monkeypatch.setattr(module, handler, lambda *args, **kw: (_ for _ in ()).throw(Called()))
    with pytest.raises(Called):
        getattr(c, how)(a + np.arange(5, 1024) * PAGE_SIZE, 3)


def test_batch_and_scalar_count_the_same_faults():
    got = []
    for how in ("write_many", "write_many_scalar"):
        k = Kernel(ram=512 << 20, check=True)
        p, c, a = _shared_thp(k, split=False)
        getattr(c, how)(a + np.arange(0, 1024, 3) * PAGE_SIZE, 3)
        v = k.vmstat_snapshot()
        got.append((v["pgfault"], v["pgreuse"], v["thp_split_pmd"], v["sim_cow_pages"]))
    assert got[0] == got[1]
    assert got[0][2] == 2 and got[0][3] == len(range(0, 1024, 3))


@pytest.mark.parametrize("build", ["upstream", "thp-cow-meant", "pre-5.8", "mthp-cow:order=9"])
def test_one_round_of_pmd_faults_takes_every_branch_as_the_scalar_path(build):
    """One round of the batched path hands do_huge_pmd_wp_pages() a huge zero PMD,
    a folio left with one reference (reused), a shared folio (copied or split) and
    an untouched shared one; the result equals faulting them one at a time."""
    from thpcow.kernel import MADV_DONTNEED

    got = []
    for how in ("write_many", "write_many_scalar"):
        k = Kernel(ram=512 << 20, check=True, build=build, seed=3)
        k.sysfs.write("use_zero_page", "1")
        p = k.spawn()
        a = p.mmap(8 << 20)
        p.madvise(a, 8 << 20, MADV_HUGEPAGE)
        p.read(a, 1)                                # block 0: the huge zero PMD
        p.write(a + (2 << 20), 6 << 20, 1)          # blocks 1-3: THPs
        c = p.fork()
        c.madvise(a + (2 << 20), 2 << 20, MADV_DONTNEED)   # block 1: the parent's is left alone
        pages = np.array([0, 5, 512, 700, 1024, 1030, 1600], dtype=np.int64)
        getattr(p, how)(a + pages * PAGE_SIZE, 7)
        v = k.vmstat_snapshot()
        pt = p.mm.pt
        kinds = [int(pt.pmd_kind[pt.slot_of[(a >> 21) + i]]) for i in range(4)]
        got.append(({n: v[n] for n in ("pgfault", "pgreuse", "thp_split_pmd", "thp_fault_alloc",
                                        "sim_cow_pages", "sim_cow_bytes", "sim_huge_cow")},
                    kinds, p.read_many(a + np.arange(2048) * PAGE_SIZE).tolist(),
                    c.read_many(a + np.arange(2048) * PAGE_SIZE).tolist()))
        k.check()
    assert got[0] == got[1]
    assert got[0][0]["pgfault"] > 0
