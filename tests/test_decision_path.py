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
                                                    (hm, "do_huge_pmd_wp_page", False)])
def test_cow_goes_through_the_fault_handler(monkeypatch, how, module, handler, split):
    """Both store paths reach do_wp_page() (PTE COW) and do_huge_pmd_wp_page() (PMD COW)."""
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
