"""The address-arithmetic helpers (constants.py, pgtable.py): the kernel's macros, on ints and arrays alike."""

from __future__ import annotations

import numpy as np
from hypothesis import given, strategies as st

from thpcow.kernel.constants import (
    ALIGN, ALIGN_DOWN, HPAGE_PMD_MASK, HPAGE_PMD_NR, HPAGE_PMD_SIZE, IS_ALIGNED, PAGE_ALIGN, PAGE_ALIGNED, PAGE_MASK,
    PAGE_SIZE, PFN_PHYS, PHYS_PFN, PMD_MASK, PMD_SIZE, PTRS_PER_PTE, offset_in_page,
)
from thpcow.kernel.pgtable import pmd_addr_end, pmd_index, pte_index, vpn_pmd_index, vpn_pte_index

ADDR = st.integers(0, (1 << 47) - 1)
POW2 = st.integers(0, 30).map(lambda s: 1 << s)


def test_geometry():
    assert PAGE_SIZE == 4096 and PMD_SIZE == HPAGE_PMD_SIZE == 2 << 20 and HPAGE_PMD_NR == PTRS_PER_PTE == 512
    assert PMD_MASK == HPAGE_PMD_MASK == -(2 << 20) and PAGE_MASK == -4096


@given(ADDR, POW2)
def test_macros_on_ints(addr, a):
    assert PHYS_PFN(addr) == addr // PAGE_SIZE and PFN_PHYS(PHYS_PFN(addr)) == addr - addr % PAGE_SIZE
    assert ALIGN_DOWN(addr, a) == addr - addr % a
    assert ALIGN(addr, a) == -(-addr // a) * a
    assert IS_ALIGNED(addr, a) == (addr % a == 0)
    assert PAGE_ALIGN(addr) == ALIGN(addr, PAGE_SIZE)
    assert PAGE_ALIGNED(addr) == IS_ALIGNED(addr, PAGE_SIZE)
    assert offset_in_page(addr) == addr % PAGE_SIZE
    assert pmd_index(addr) == addr // PMD_SIZE
    assert pte_index(addr) == (addr // PAGE_SIZE) % PTRS_PER_PTE
    assert vpn_pmd_index(PHYS_PFN(addr)) == pmd_index(addr)
    assert vpn_pte_index(PHYS_PFN(addr)) == pte_index(addr)
    assert addr & HPAGE_PMD_MASK == ALIGN_DOWN(addr, HPAGE_PMD_SIZE)


@given(ADDR, st.integers(1, 8 << 20))
def test_pmd_addr_end(addr, length):
    end = pmd_addr_end(addr, addr + length)
    assert addr < end <= addr + length
    assert end == addr + length or IS_ALIGNED(end, PMD_SIZE) and end - addr <= PMD_SIZE


@given(st.lists(ADDR, min_size=1, max_size=50), POW2)
def test_array_forms_equal_the_int_forms(addrs, a):
    arr = np.array(addrs, dtype=np.int64)
    for fn in (PHYS_PFN, PFN_PHYS, PAGE_ALIGN, PAGE_ALIGNED, offset_in_page, pmd_index, pte_index, vpn_pmd_index,
               vpn_pte_index):
        out = fn(arr)
        assert isinstance(out, np.ndarray)
        assert out.tolist() == [fn(x) for x in addrs], fn.__name__
    for fn in (ALIGN, ALIGN_DOWN, IS_ALIGNED):
        assert fn(arr, a).tolist() == [fn(x, a) for x in addrs], fn.__name__
