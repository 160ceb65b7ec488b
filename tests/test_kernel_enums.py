"""The enum types of the kernel model: enum tva_type and the gfp_t reclaim bits of a THP allocation."""

from __future__ import annotations

import pytest

from thpcow.kernel import MADV_HUGEPAGE, Kernel
from thpcow.kernel import huge_memory as hm
from thpcow.kernel.page_alloc import GFP_TRANSHUGE, GFP_TRANSHUGE_LIGHT, Gfp, gfp_from


def test_tva_type_is_the_kernels_enum():
    assert [t.name for t in hm.TvaType] == ["TVA_SMAPS", "TVA_PAGEFAULT", "TVA_KHUGEPAGED", "TVA_FORCED_COLLAPSE"]
    assert hm.TVA_PAGEFAULT is hm.TvaType.TVA_PAGEFAULT and hm.TvaType("pagefault") is hm.TVA_PAGEFAULT


def test_thp_vma_allowable_orders_takes_the_former_strings():
    k = Kernel(ram=512 << 20)
    p = k.spawn()
    a = p.mmap(8 << 20)
    p.madvise(a, 8 << 20, MADV_HUGEPAGE)
    p.write(a, 1)                                   # the VMA gets its anon_vma
    vma = p.mm.find_vma(a)
    for tva in hm.TvaType:
        want = hm.thp_vma_allowable_orders(k, p.mm, vma, tva)
        assert hm.thp_vma_allowable_orders(k, p.mm, vma, tva.value) == want
    with pytest.raises(ValueError):
        hm.thp_vma_allowable_orders(k, p.mm, vma, "fault")


def test_gfp_bits_are_the_kernels():
    assert Gfp.DIRECT_RECLAIM == 0x400 and Gfp.KSWAPD_RECLAIM == 0x800       # ___GFP_*_RECLAIM_BIT 10 and 11
    assert GFP_TRANSHUGE == Gfp.DIRECT_RECLAIM and GFP_TRANSHUGE_LIGHT == 0


@pytest.mark.parametrize("defrag,advised,want", [
    ("always", False, Gfp.DIRECT_RECLAIM), ("always", True, Gfp.DIRECT_RECLAIM),
    ("defer", False, Gfp.KSWAPD_RECLAIM), ("defer", True, Gfp.KSWAPD_RECLAIM),
    ("defer+madvise", False, Gfp.KSWAPD_RECLAIM), ("defer+madvise", True, Gfp.DIRECT_RECLAIM),
    ("madvise", False, Gfp(0)), ("madvise", True, Gfp.DIRECT_RECLAIM),
    ("never", False, Gfp(0)), ("never", True, Gfp(0)),
])
def test_vma_thp_gfp_mask(defrag, advised, want):
    k = Kernel(ram=512 << 20)
    k.sysfs.write("defrag", defrag)
    p = k.spawn()
    a = p.mmap(4 << 20)
    if advised:
        p.madvise(a, 4 << 20, MADV_HUGEPAGE)
    got = hm.vma_thp_gfp_mask(k, p.mm.find_vma(a))
    assert isinstance(got, Gfp) and got == want


def test_alloc_thp_takes_the_former_values():
    assert [gfp_from(v) for v in (True, "direct", False, "light", "kswapd")] == \
        [GFP_TRANSHUGE, GFP_TRANSHUGE, GFP_TRANSHUGE_LIGHT, GFP_TRANSHUGE_LIGHT, Gfp.KSWAPD_RECLAIM]
    assert gfp_from(0xC00) == Gfp.DIRECT_RECLAIM | Gfp.KSWAPD_RECLAIM
    for bad in ("stall", None, 1.0):
        with pytest.raises(ValueError):
            gfp_from(bad)
    k = Kernel(ram=64 << 20)
    blocks = [k.alloc_thp(v) for v in (True, "kswapd", "light", Gfp.DIRECT_RECLAIM)]
    assert all(b >= 0 and b % 512 == 0 for b in blocks) and len(set(blocks)) == 4


def test_kswapd_reclaim_wakes_kcompactd_when_no_block_is_free():
    k = Kernel(ram=64 << 20)
    while k.mem.alloc(9) >= 0:                      # no order-9 block left
        pass
    assert k.alloc_thp(Gfp.KSWAPD_RECLAIM) < 0 and k.kcompactd_pending
    assert k.vmstat_snapshot()["compact_stall"] == 0
