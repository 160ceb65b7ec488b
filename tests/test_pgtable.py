"""The page-table writers (kernel/pgtable.py) and page_table_check (kernel/page_table_check.py).

1. Only pgtable.py stores into the page-table arrays: a static scan of every other
   module of src/thpcow (assignments, augmented assignments, slice stores, stores through
   a local view, np.put/np.copyto/ufunc.at and friends, getattr/setattr by name), and a
   test that the scan catches each form.
2. page_table_check catches a writable mapping of a page mapped elsewhere (PTE and PMD,
   at set time and on a flag update), a clear of an entry that was never set, and a frame
   freed while mapped; a correct COW keeps the counters consistent and an exit brings
   them back to zero.
3. Random programs (Hypothesis) with ``check=True``: page_table_check on every store,
   the whole-state checker (which compares its counters) after every call.
"""

from __future__ import annotations

import ast
import pathlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thpcow.kernel import (
    MADV_COLLAPSE, MADV_DONTNEED, MADV_HUGEPAGE, MADV_NOHUGEPAGE, MADV_PAGEOUT, MREMAP_MAYMOVE, PAGE_SIZE,
    PROT_READ, PROT_WRITE, InvariantViolation, Kernel, KernelError,
)
from thpcow.kernel import pgtable, rmap
from thpcow.kernel.constants import HPAGE_PMD_NR, HPAGE_PMD_SIZE
from thpcow.kernel.page_table_check import PageTableCheckError
from thpcow.kernel.pgtable import PMD_LEAF, PMD_TABLE, PTE_NEW_ANON, _PAGE_RW

RAM = 512 << 20
SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "thpcow"


# -- 1. the only writer --------------------------------------------------------------------------------
PT_ARRAYS = {"pte_pfn", "pte_flags", "pmd_kind", "pmd_folio", "pmd_flags", "pmd_row", "pmd_index"}
# Calls that store into their first argument (np.put(a, ...)) or their receiver (a.fill(...), np.add.at(a, ...)).
MUTATING_CALLS = {"put", "copyto", "place", "putmask", "fill", "itemset", "at", "sort", "resize", "setfield"}


def _array_of(node) -> str | None:
    """The page-table array an expression like ``x.pt.pte_pfn[r][c]`` indexes into, if any."""
    while isinstance(node, ast.Subscript):
        node = node.value
    return node.attr if isinstance(node, ast.Attribute) and node.attr in PT_ARRAYS else None


def _name_of(node) -> str | None:
    while isinstance(node, ast.Subscript):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _scope_nodes(scope):
    """ast.walk() of one function (or module, or class body) without entering nested scopes."""
    todo = list(ast.iter_child_nodes(scope))
    while todo:
        n = todo.pop()
        yield n
        if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            todo.extend(ast.iter_child_nodes(n))


def page_table_stores(source: str) -> list[tuple[int, str]]:
    """(line, array) of every store into a page-table array in ``source``.

    Local names bound to a page-table array or a subscript of one (a view, e.g.
    ``flags = pt.pte_flags[row, a:b]``) count as the array: stores through them
    are stores too.  The scan is per function and flow-insensitive.
    """
    tree = ast.parse(source)
    scopes = [tree] + [n for n in ast.walk(tree)
                       if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef))]
    found = set()
    for scope in scopes:
        views: dict[str, str] = {}
        for n in _scope_nodes(scope):
            if isinstance(n, ast.Assign) and _array_of(n.value):
                for t in n.targets:
                    for e in (t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t]):
                        if isinstance(e, ast.Name):
                            views[e.id] = _array_of(n.value)
        for n in _scope_nodes(scope):
            targets = n.targets if isinstance(n, ast.Assign) else \
                [n.target] if isinstance(n, (ast.AugAssign, ast.AnnAssign)) else []
            for t in [e for t in targets for e in (t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t])]:
                if _array_of(t):
                    found.add((n.lineno, _array_of(t)))
                elif (isinstance(n, ast.AugAssign) or isinstance(t, ast.Subscript)) and _name_of(t) in views:
                    found.add((n.lineno, views[_name_of(t)]))
            if isinstance(n, ast.Call):
                fn = n.func
                name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
                if name in ("getattr", "setattr") and len(n.args) > 1 and isinstance(n.args[1], ast.Constant) \
                        and n.args[1].value in PT_ARRAYS:
                    found.add((n.lineno, n.args[1].value))
                if name in MUTATING_CALLS:
                    for obj in n.args[:1] + ([fn.value] if isinstance(fn, ast.Attribute) else []):
                        arr = _array_of(obj) or views.get(_name_of(obj) or "")
                        if arr:
                            found.add((n.lineno, arr))
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in PT_ARRAYS:
                found.add((n.lineno, n.value))        # the arrays named as strings: getattr/setattr aliasing
    return sorted(found)


def test_only_pgtable_stores_into_the_page_tables():
    """Every store into pte_pfn/pte_flags/pmd_* outside kernel/pgtable.py is a bug: use a writer."""
    files = sorted(p for p in SRC.rglob("*.py") if p.name != "pgtable.py")
    assert len(files) > 20 and any(p.name == "memory.py" for p in files)
    bad = [f"{p.relative_to(SRC.parent)}:{line}: store into {arr}"
           for p in files for line, arr in page_table_stores(p.read_text())]
    assert not bad, "page-table stores outside kernel/pgtable.py:\n" + "\n".join(bad)


@pytest.mark.parametrize("snippet", [
    "pt.pte_pfn[row, i] = pfn",
    "mm.pt.pte_flags[row, i] |= 2",
    "pt.pmd_kind[s], pt.pmd_folio[s] = 0, -1",
    "pt.pte_pfn[row, lo:hi] = -1",
    "pt.pte_pfn[row] = np.arange(512)",
    "pt.pte_flags[row, lo:hi][swp] &= 3",
    "pt.pmd_flags[np.unique(sc)] |= 8",
    "pt.pmd_row[s]: int = 3",
    "pt.pte_pfn = new_array",
    "flags = pt.pte_flags[row, a:b]\nflags &= 1",
    "flags = pt.pte_flags[row, a:b]\nflags[ae] |= 2",
    "pfns = pt.pte_pfn\npfns[r, c] = 5",
    "np.put(pt.pte_pfn, idx, 0)",
    "np.copyto(mm.pt.pte_flags[row], src)",
    "np.add.at(pt.pmd_flags, slots, 1)",
    "pt.pte_flags[row].fill(0)",
    "setattr(pt, 'pmd_kind', arr)",
    "arr = getattr(pt, 'pmd_folio')\narr[d] = 1",
    "for name in ('pmd_kind', 'pmd_row'):\n    getattr(pt, name)[d] = 0",
])
def test_the_store_scan_catches_each_form(snippet):
    body = "def f(pt, mm, row, i, s, lo, hi, a, b):\n" + "".join("    " + ln + "\n" for ln in snippet.splitlines())
    assert page_table_stores(body), snippet


@pytest.mark.parametrize("snippet", [
    "x = pt.pte_pfn[row, i]",
    "flags = pt.pte_flags[row, a:b].copy()\nflags &= 1",
    "pfn = np.where(kind == 2, pt.pte_pfn[rows, cols], -1)\npfn[leaf] = 0",
    "k.mem.folio[pfns] = -1",
    "f.flags[fid] |= 4",
    "pgtable.set_pte_at(k, mm, row, i, pfn, 3)",
])
def test_the_store_scan_lets_reads_and_other_arrays_be(snippet):
    body = "def f(pt, mm, row, i, a, b, k, f, fid, pfns, kind, rows, cols, leaf, pfn):\n" + \
        "".join("    " + ln + "\n" for ln in snippet.splitlines())
    assert not page_table_stores(body), snippet


# -- 2. page_table_check --------------------------------------------------------------------------------
def small_region(k: Kernel, pages: int = 8, token: int = 1):
    """A process with ``pages`` 4 KiB pages written (no THP: MADV_NOHUGEPAGE)."""
    p = k.spawn()
    a = p.mmap(pages * PAGE_SIZE)
    p.madvise(a, pages * PAGE_SIZE, MADV_NOHUGEPAGE)
    p.write(a, pages * PAGE_SIZE, token)
    return p, a


def thp_region(k: Kernel, size: int = HPAGE_PMD_SIZE, token: int = 1):
    p = k.spawn()
    a = p.mmap(size)
    p.madvise(a, size, MADV_HUGEPAGE)
    p.write(a, size, token)
    return p, a


def pte_of(p, addr: int) -> tuple[int, int]:
    """(row, col) of the PTE mapping ``addr`` in ``p``."""
    pt = p.mm.pt
    s = pt.slot_of[addr // HPAGE_PMD_SIZE]
    assert pt.pmd_kind[s] == PMD_TABLE
    return int(pt.pmd_row[s]), (addr // PAGE_SIZE) % 512


def slot_of(p, addr: int) -> int:
    return p.mm.pt.slot_of[addr // HPAGE_PMD_SIZE]


def test_page_table_check_follows_check_unless_told():
    assert Kernel(ram=RAM).ptc is None
    assert Kernel(ram=RAM, check=True).ptc is not None
    assert Kernel(ram=RAM, check=True, page_table_check=False).ptc is None
    k = Kernel(ram=RAM, page_table_check=True)
    assert k.ptc is not None and not k.check_enabled and k.mem.ptc is k.ptc


def test_forked_pages_are_counted_twice_and_read_only():
    k = Kernel(ram=RAM, check=True)
    p, a = small_region(k, pages=4)
    row, i = pte_of(p, a)
    pfn = int(p.mm.pt.pte_pfn[row, i])
    assert k.ptc.anon_map_count[pfn] == 1
    c = p.fork()
    assert k.ptc.anon_map_count[pfn] == 2
    assert not p.mm.pt.pte_flags[row, i] & _PAGE_RW and not c.mm.pt.pte_flags[pte_of(c, a)] & _PAGE_RW


def test_making_a_shared_pte_writable_is_caught():
    """After fork, the child's PTE made writable while the parent still maps the page."""
    k = Kernel(ram=RAM, check=True)
    p, a = small_region(k)
    c = p.fork()
    row, i = pte_of(c, a)
    with pytest.raises(PageTableCheckError, match="writable"):
        pgtable.pte_update_flags(k, c.mm, row, i, set_bits=_PAGE_RW)
    assert not c.mm.pt.pte_flags[row, i] & _PAGE_RW          # nothing was stored
    with pytest.raises(PageTableCheckError, match="writable"):
        pgtable.ptep_set_access_flags(k, c.mm, np.array([row]), np.array([i]), _PAGE_RW)
    with pytest.raises(PageTableCheckError, match="already mapped 1 time"):
        pgtable.set_pte_at(k, c.mm, row, i, int(c.mm.pt.pte_pfn[row, i]), PTE_NEW_ANON)
    # The same page installed writable at a second, empty place in the parent.
    prow, pi = pte_of(p, a)
    with pytest.raises(PageTableCheckError, match="writable mapping"):
        pgtable.set_ptes_scatter(k, p.mm, np.array([prow]), np.array([(pi + 100) % 512]),
                                 np.array([p.mm.pt.pte_pfn[prow, pi]]), PTE_NEW_ANON)


def test_making_a_shared_pmd_writable_is_caught():
    k = Kernel(ram=RAM, check=True)
    p, a = thp_region(k)
    c = p.fork()
    s = slot_of(c, a)
    assert c.mm.pt.pmd_kind[s] == PMD_LEAF
    fid, flags = int(c.mm.pt.pmd_folio[s]), int(c.mm.pt.pmd_flags[s])
    head = int(k.folios.head[fid])
    assert (k.ptc.anon_map_count[head: head + HPAGE_PMD_NR] == 2).all()
    with pytest.raises(PageTableCheckError, match="PMD of anon folio"):
        pgtable.pmd_update_flags(k, c.mm, s, set_bits=_PAGE_RW)
    with pytest.raises(PageTableCheckError, match="PMD of anon folio"):
        pgtable.pmdp_set_access_flags(k, c.mm, s, _PAGE_RW)
    with pytest.raises(PageTableCheckError, match="writable PMD"):
        pgtable.set_pmd_at(k, c.mm, s, fid, flags | _PAGE_RW)


def test_a_writable_pte_over_a_pages_pmd_mapping_is_caught():
    """The child splits its PMD (PTEs of the same THP); making one writable while the parent's
    PMD still maps the folio is caught."""
    k = Kernel(ram=RAM, check=True)
    p, a = thp_region(k)
    c = p.fork()
    c.mprotect(a, PAGE_SIZE, PROT_READ)                 # splits the child's PMD, keeps the folio
    row, i = pte_of(c, a + PAGE_SIZE)
    with pytest.raises(PageTableCheckError, match="mapped 2 times"):
        pgtable.pte_update_flags(k, c.mm, row, i, set_bits=_PAGE_RW)


def test_correct_cow_keeps_the_counters_and_exit_zeroes_them():
    k = Kernel(ram=RAM, check=True)
    p, a = small_region(k, pages=4, token=1)
    q, b = thp_region(k, 2 * HPAGE_PMD_SIZE, token=2)
    c, d = p.fork(), q.fork()
    old = int(p.mm.pt.pte_pfn[pte_of(p, a)])
    c.write(a, 8, 3)                                    # PTE COW in the child
    row, i = pte_of(c, a)
    new = int(c.mm.pt.pte_pfn[row, i])
    assert new != old and k.ptc.anon_map_count[new] == 1 and k.ptc.anon_map_count[old] == 1
    p.write(a, 8, 4)                                    # the parent reuses: now the only mapping
    assert p.mm.pt.pte_pfn[pte_of(p, a)] == old and p.mm.pt.pte_flags[pte_of(p, a)] & _PAGE_RW
    d.write(b + 5 * PAGE_SIZE, 8, 5)                    # PMD COW: the child's PMD is split, 4 KiB copied
    q.write(b + HPAGE_PMD_SIZE, HPAGE_PMD_SIZE, 6)      # the parent's second THP: split + 512 COWs
    d.madvise(b, 2 * HPAGE_PMD_SIZE, MADV_COLLAPSE)     # collapse the child's pages back into THPs
    d.mremap(b, 2 * HPAGE_PMD_SIZE, 4 * HPAGE_PMD_SIZE, MREMAP_MAYMOVE)
    k.check()
    assert k.ptc.anon_map_count.sum() > 0
    for proc in (c, p, d, q):
        proc.exit()
    assert not k.ptc.anon_map_count.any() and not k.ptc.file_map_count.any()


def test_clearing_an_entry_that_was_never_set_is_caught():
    """An entry stored behind the writers' back (here by the test) has no count to take back."""
    k = Kernel(ram=RAM, check=True)
    p, a = thp_region(k)
    p.madvise(a + HPAGE_PMD_SIZE // 2, HPAGE_PMD_SIZE // 2, MADV_DONTNEED)   # split; half unmapped
    row, i = pte_of(p, a)
    pfn = int(p.mm.pt.pte_pfn[row, i])
    j = 400                                             # unmapped, but its page is still in the folio
    p.mm.pt.pte_pfn[row, j] = pfn + j
    p.mm.pt.pte_flags[row, j] = PTE_NEW_ANON & ~_PAGE_RW
    assert k.ptc.anon_map_count[pfn + j] == 0
    with pytest.raises(PageTableCheckError, match="would go negative"):
        pgtable.pte_clear(k, p.mm, row, j)


def test_clearing_a_pmd_that_was_never_set_is_caught():
    k = Kernel(ram=RAM, check=True)
    p, a = thp_region(k)
    s = slot_of(p, a)
    fid = int(p.mm.pt.pmd_folio[s])
    pgtable.pmd_clear(k, p.mm, s)                       # the counts go back to 0 ...
    p.mm.pt.pmd_kind[s], p.mm.pt.pmd_folio[s] = PMD_LEAF, fid   # ... and the leaf comes back unaccounted
    with pytest.raises(PageTableCheckError, match="would go negative"):
        pgtable.pmdp_huge_get_and_clear(k, p.mm, s)


def test_a_frame_freed_while_mapped_is_caught():
    """page_table_check_zero(): the buddy allocator takes back no frame that a page table maps."""
    k = Kernel(ram=RAM, check=True)
    p, a = small_region(k, pages=2)
    pfn = int(p.mm.pt.pte_pfn[pte_of(p, a)])
    with pytest.raises(PageTableCheckError, match="freed while page tables map it"):
        rmap.free_folio(k, int(k.mem.folio[pfn]))


def test_the_checker_compares_the_counters_with_the_page_tables():
    k = Kernel(ram=RAM, check=True)
    p, a = small_region(k, pages=2)
    pfn = int(p.mm.pt.pte_pfn[pte_of(p, a)])
    k.check()
    k.ptc.anon_map_count[pfn] += 1
    with pytest.raises(InvariantViolation, match="anon_map_count=2 but the page tables map it 1"):
        k.check()


def test_swap_out_and_in_and_migration_keep_the_counters():
    k = Kernel(ram=RAM, check=True, swap=64 << 20)
    p, a = thp_region(k, 2 * HPAGE_PMD_SIZE, token=7)
    c = p.fork()
    head = int(k.folios.head[int(p.mm.pt.pmd_folio[slot_of(p, a)])])
    new_fid = k.migrate(head)                           # a PMD-mapped THP mapped by two mms
    new_head = int(k.folios.head[new_fid])
    assert new_head != head and not k.ptc.anon_map_count[head: head + HPAGE_PMD_NR].any()
    assert (k.ptc.anon_map_count[new_head: new_head + HPAGE_PMD_NR] == 2).all()
    c.write(a, 8, 8)
    p.madvise(a, 2 * HPAGE_PMD_SIZE, MADV_PAGEOUT)
    c.madvise(a, 2 * HPAGE_PMD_SIZE, MADV_PAGEOUT)
    assert p.read(a + PAGE_SIZE)[0] == 7 and c.read(a)[0] == 8
    p.write(a + 3 * PAGE_SIZE, 8, 9)
    k.check()
    p.exit()
    c.exit()
    assert not k.ptc.anon_map_count.any()


# -- 3. random programs ------------------------------------------------------------------------------------
OPS = ("mmap", "madvise_huge", "write", "write", "write", "fork", "exit", "munmap", "mprotect", "dontneed",
       "collapse", "mremap")
SIZES = (HPAGE_PMD_SIZE, 2 * HPAGE_PMD_SIZE, 16 * PAGE_SIZE, HPAGE_PMD_SIZE + 8 * PAGE_SIZE)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 1 << 16), st.integers(0, 1 << 16),
                          st.integers(0, 1 << 16)), min_size=4, max_size=40))
def test_random_programs_pass_page_table_check(program):
    """Random system calls and stores on a checked kernel: page_table_check on every page-table
    store, the whole-state checker (including the counters) after every call; at the end every
    process exits and every count is back to zero.

    Every program starts from a parent with a written THP region and a written 4 KiB region,
    forked once, so that COW of PTEs and PMDs is always in reach.
    """
    k = Kernel(ram=RAM, check=True)
    parent = k.spawn()
    start = [(parent.mmap(2 * HPAGE_PMD_SIZE), 2 * HPAGE_PMD_SIZE), (parent.mmap(16 * PAGE_SIZE), 16 * PAGE_SIZE)]
    parent.madvise(start[0][0], start[0][1], MADV_HUGEPAGE)
    for addr, size in start:
        parent.write(addr, size, token=1)
    procs = [parent, parent.fork()]
    regions: dict[int, list[tuple[int, int]]] = {p.pid: list(start) for p in procs}
    for op, x, y, z in program:
        p = procs[x % len(procs)]
        mine = regions[p.pid]
        if op == "mmap" or not mine:
            size = SIZES[y % len(SIZES)]
            mine.append((p.mmap(size), size))
            if op == "mmap":
                continue
        addr, size = mine[y % len(mine)]
        off = (z % (size // PAGE_SIZE)) * PAGE_SIZE
        length = min(size - off, PAGE_SIZE * (1 + z % 3) if x & 1 else size - off)
        try:
            if op == "madvise_huge":
                p.madvise(addr, size, MADV_HUGEPAGE)
            elif op == "write":
                p.write(addr + off, length, token=z + 2)
            elif op == "fork" and len(procs) < 4:
                c = p.fork()
                procs.append(c)
                regions[c.pid] = list(mine)
            elif op == "exit" and len(procs) > 1:
                p.exit()
                procs.remove(p)
                del regions[p.pid]
            elif op == "munmap":
                p.munmap(addr + off, length)
            elif op == "mprotect":
                p.mprotect(addr + off, length, PROT_READ if z & 1 else PROT_READ | PROT_WRITE)
            elif op == "dontneed":
                p.madvise(addr + off, length, MADV_DONTNEED)
            elif op == "collapse":
                p.madvise(addr, size, MADV_COLLAPSE)
            elif op == "mremap":
                new_size = SIZES[z % len(SIZES)]
                mine.append((p.mremap(addr, size, new_size, MREMAP_MAYMOVE), new_size))
                mine.remove((addr, size))
        except KernelError:
            pass                       # EFAULT/ENOMEM/EINVAL/SIGSEGV on ranges a munmap left: not our concern
    k.check()
    for p in procs:
        p.exit()
    assert not k.ptc.anon_map_count.any() and not k.ptc.file_map_count.any()


# -- rule 13: a writable entry needs VM_WRITE ------------------------------------------------------
@pytest.mark.parametrize("thp", [False, True])
def test_checker_catches_writable_entries_left_by_a_broken_mprotect(monkeypatch, thp):
    """Injected bug: mprotect(PROT_READ) forgets change_protection(), so the PTEs (or the PMD)
    stay writable in a read-only VMA; the checker names the entry."""
    from thpcow.kernel import MADV_HUGEPAGE, PROT_READ, InvariantViolation, Kernel
    from thpcow.kernel import mprotect as mp
    k = Kernel(ram=512 << 20, check=True)
    p = k.spawn()
    a = p.mmap(2 << 20)
    if thp:
        p.madvise(a, 2 << 20, MADV_HUGEPAGE)
    p.write(a, 2 << 20, 1)
    p.mprotect(a, 2 << 20, PROT_READ)               # the real change_protection(): all fine
    p.mprotect(a, 2 << 20, PROT_READ | 2)
    p.write(a, 2 << 20, 2)
    monkeypatch.setattr(mp, "change_protection", lambda *args, **kw: None)
    with pytest.raises(InvariantViolation, match="without VM_WRITE"):
        p.mprotect(a, 2 << 20, PROT_READ)
