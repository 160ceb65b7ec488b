"""Deliberately broken kernels (bugs.py): each injected bug is caught by a checker.

For every gap the checker once had there is a bug that falls into it, a
kernel built with that bug, and a test that the checker raises on it, naming
what is wrong; the same program on a kernel without the bug passes.
"""

from __future__ import annotations

import numpy as np
import pytest

from thpcow.kernel import MADV_HUGEPAGE, PAGE_SIZE, PROT_READ, InvariantViolation, Kernel
from thpcow.kernel.bugs import BUGS, parse_bugs
from thpcow.kernel.constants import MADV_COLLAPSE
from thpcow.kernel.page_table_check import PageTableCheckError

RAM = 512 << 20


def _thp(k: Kernel, size: int = 2 << 20, token: int = 0):
    """A THP region written page by page with distinct tokens (token + page index + 1)."""
    p = k.spawn()
    a = p.mmap(size)
    p.madvise(a, size, MADV_HUGEPAGE)
    n = size // PAGE_SIZE
    p.write_many(a + np.arange(n) * PAGE_SIZE, token + np.arange(1, n + 1))
    return p, a


# -- the mm-id slots of a large folio -------------------------------------------------------------
def _fork_then_child_exits(k: Kernel):
    p, a = _thp(k)
    c = p.fork()
    c.exit()
    return p, a


def test_shared_bit_that_stays_set_is_caught():
    """After the child exits, the parent's slot holds every mapping: SHARED must clear
    (folio_sub_return_large_mapcount()); with the bug it stays and the COW path would
    copy a page nobody else maps."""
    k = Kernel(ram=RAM, check=True, inject=["mm-ids-shared-sticks"])
    with pytest.raises(InvariantViolation, match="MM_IDS_SHARED is still set but mm id .* holds all 1 mappings"):
        _fork_then_child_exits(k)
    from thpcow.kernel.folio import PG_MM_IDS_SHARED
    p, a = _fork_then_child_exits(Kernel(ram=RAM, check=True))
    fid = int(p.mm.pt.pmd_folio[p.mm.pt.slot_of[a >> 21]])
    assert not p.kernel.folios.flags[fid] & PG_MM_IDS_SHARED


def test_shared_bit_after_a_pte_mapped_unmap_is_caught():
    """The same rule on the batched path (sub_large_mapcount_many): a PTE-mapped THP
    shared with a child that then zaps its half."""
    from thpcow.kernel import MADV_DONTNEED

    def run(k):
        p, a = _thp(k)
        p.mprotect(a, PAGE_SIZE, PROT_READ)            # split the PMD: PTE-mapped from here on
        c = p.fork()
        c.madvise(a, 2 << 20, MADV_DONTNEED)
        return p
    run(Kernel(ram=RAM, check=True))
    with pytest.raises(InvariantViolation, match="MM_IDS_SHARED is still set"):
        run(Kernel(ram=RAM, check=True, inject=["mm-ids-shared-sticks"]))


def test_leaked_mm_id_slot_is_caught():
    k = Kernel(ram=RAM, check=True, inject=["mm-ids-slot-leak"])
    with pytest.raises(InvariantViolation, match=r"mm-id slot \d \(mm id \d+\) counts 0 mappings but that mm has 0"):
        _fork_then_child_exits(k)


def test_slot_counts_are_checked_against_the_page_tables():
    """A slot that counts more mappings than its mm has (a double add) is caught."""
    k = Kernel(ram=RAM, check=True)
    p, a = _thp(k)
    fid = int(p.mm.pt.pmd_folio[p.mm.pt.slot_of[a >> 21]])
    k.folios.mm_cnt0[fid] += 1
    with pytest.raises(InvariantViolation, match="counts 2 mappings but that mm has 1"):
        k.check()


# -- a writable entry in a VMA without VM_WRITE --------------------------------------------------
@pytest.mark.parametrize("thp", [True, False])
def test_mprotect_that_leaves_entries_writable_is_caught(thp):
    def run(k):
        p = k.spawn()
        a = p.mmap(2 << 20)
        if thp:
            p.madvise(a, 2 << 20, MADV_HUGEPAGE)
        p.write(a, 2 << 20, 1)
        p.mprotect(a, 2 << 20, PROT_READ)
    run(Kernel(ram=RAM, check=True))
    with pytest.raises(InvariantViolation, match="without VM_WRITE"):
        run(Kernel(ram=RAM, check=True, inject=["mprotect-keeps-write"]))


# -- a large copy whose contents are wrong -------------------------------------------------------
def _series_copy(k):
    k.sysfs.write("thp_cow", "always")
    p, a = _thp(k, token=1000)
    c = p.fork()
    c.write(a + 100 * PAGE_SIZE, 8, 7)                 # the whole 2 MiB is copied for the child
    return p, c, a


def _collapse(k):
    p = k.spawn()
    a = p.mmap(2 << 20)
    p.write_many(a + np.arange(0, 512, 2) * PAGE_SIZE, np.arange(1, 257))
    p.madvise(a, 2 << 20, MADV_HUGEPAGE)
    p.madvise(a, 2 << 20, MADV_COLLAPSE)


def _pre58_fallback(k):
    from tests.test_policies import exhaust_thp_blocks
    p, a = _thp(k, token=50)
    c = p.fork()
    exhaust_thp_blocks(k)
    c.write(a + PAGE_SIZE, 8, 6)                       # 512 pages copied one by one


def _mthp_block(k):
    p, a = _thp(k, token=9)
    c = p.fork()
    c.write(a + 37 * PAGE_SIZE, 8, 5)                  # the aligned 64 KiB block is copied


@pytest.mark.parametrize("build, program", [
    ("thp-cow-meant", _series_copy),
    ("upstream", _collapse),
    ("pre-5.8", _pre58_fallback),
    ("mthp-cow:order=4", _mthp_block),
])
def test_a_large_copy_with_wrong_pages_is_caught(build, program):
    """Every page of the copy is compared with its source: a copy right in its first
    page only (the page a one-sample check would look at) is caught."""
    program(Kernel(ram=RAM, check=True, build=build))
    with pytest.raises(InvariantViolation, match=r"copy of \d+ pages: \d+ differ from their source, the first page \d+ "):
        program(Kernel(ram=RAM, check=True, build=build, inject=["copy-first-page-only"]))


def test_the_series_copy_holds_every_page():
    """Without a bug: every one of the 512 pages of the child's copy reads what the parent wrote."""
    k = Kernel(ram=RAM, check=True, build="thp-cow-meant")
    p, c, a = _series_copy(k)
    got = c.read_many(a + np.arange(512) * PAGE_SIZE)
    want = 1000 + np.arange(1, 513)
    want[100] = 7
    assert (got == want).all()
    assert (p.read_many(a + np.arange(512) * PAGE_SIZE) == 1000 + np.arange(1, 513)).all()


# -- page_table_check at each store --------------------------------------------------------------
@pytest.mark.parametrize("store", ["write", "write_many", "write_many_scalar"])
def test_page_table_check_refuses_a_second_writable_mapping_at_the_store(store):
    """The hook runs at every page-table store (not only in the checker after the call): a COW
    path that maps the shared page writable instead of copying it is refused at that store,
    on the batched and the scalar path; with the checker off the write leaks into the parent."""
    def run(k):
        p = k.spawn()
        a = p.mmap(4 * PAGE_SIZE)
        p.write(a, 4 * PAGE_SIZE, 1)
        c = p.fork()
        if store == "write":
            c.write(a, 8, 2)
        else:
            getattr(c, store)([a + PAGE_SIZE], [2])
        return p, a
    run(Kernel(ram=RAM, check=True))
    with pytest.raises(PageTableCheckError, match="a writable anon page must be mapped once"):
        run(Kernel(ram=RAM, page_table_check=True, inject=["cow-reuses-shared"]))
    p, a = run(Kernel(ram=RAM, inject=["cow-reuses-shared"]))
    assert 2 in p.read(a, 4 * PAGE_SIZE).tolist()               # what the checks prevent


# -- the switch itself -----------------------------------------------------------------------------
def test_bugs_are_off_unless_asked_for_and_unknown_names_are_refused():
    assert Kernel(ram=RAM).bugs == frozenset()
    assert parse_bugs("copy-first-page-only") == {"copy-first-page-only"}
    assert set(BUGS) >= {"copy-first-page-only", "mm-ids-shared-sticks", "mm-ids-slot-leak", "mprotect-keeps-write",
                         "cow-reuses-shared"}
    with pytest.raises(ValueError, match="inject='no-such-bug': unknown bug; known: "):
        Kernel(ram=RAM, inject=["no-such-bug"])
