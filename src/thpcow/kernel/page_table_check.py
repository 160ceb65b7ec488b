"""Model of mm/page_table_check.c (CONFIG_PAGE_TABLE_CHECK).

Two counters per frame say how many page-table entries map it: as an anon
page (``anon_map_count``) or as a file page (``file_map_count``; always 0 in
thpcow, kept for the rules).  The page-table writers of
:mod:`thpcow.kernel.pgtable` call in here before every store:

- an entry being cleared or overwritten is un-accounted first: every page it
  maps loses one count (a PMD leaf maps the pages of its whole folio); a
  count must not go below zero;
- an entry being installed is then accounted: every page it maps gains one;
  an anon page must never have file counts and a file page never anon ones;
- the rule that matters for copy-on-write: a *writable* entry may be added for
  an anon page only if it is then the page's only mapping (its anon count is
  1 afterwards).  A flag update that makes present entries writable is held to
  the same rule (the kernel only checks at set time; thpcow's batched paths make
  entries writable in place, so the rule is checked there too).

What is not a page is not counted: none entries, swap entries, hwpoison markers,
the zero page, the huge zero folio and special entries.  Whether a page is
anon is read from its folio (PG_ANON) at the time of the call, as PageAnon()
is, so a page whose folio was freed before its entry was cleared is caught.
When a frame goes back to the buddy allocator its counts must be zero
(page_table_check_free()).  Violations raise :class:`PageTableCheckError`.

The kernel holds ``k.ptc = None`` unless checking is on (``Kernel(check=True)``
or ``Kernel(page_table_check=True)``); the writers test it once per call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .errors import InvariantViolation
from .folio import PG_ANON, PG_HUGE_ZERO
from .pgtable import PMD_LEAF, _PAGE_RW, _PAGE_SPECIAL
from .page_alloc import ZERO_PFN

if TYPE_CHECKING:
    from .kernel import Kernel
    from .mm import MM


class PageTableCheckError(InvariantViolation):
    """page_table_check found an entry that breaks its rules (the kernel's BUG_ON())."""


def _counted(pfns, flags) -> tuple[np.ndarray, np.ndarray]:
    """The entries that map a counted page (present, not special, not the zero page):
    their pfns and whether each is writable.  ``flags``: one value for all, or an array."""
    pfns = np.asarray(pfns, dtype=np.int64).reshape(-1)
    if np.ndim(flags) == 0:
        flags = int(flags)
        if flags & _PAGE_SPECIAL:
            return pfns[:0], np.zeros(0, dtype=bool)
        p = pfns[pfns > ZERO_PFN]
        return p, np.full(len(p), bool(flags & _PAGE_RW))
    flags = np.asarray(flags).reshape(-1)
    sel = (pfns > ZERO_PFN) & ((flags & _PAGE_SPECIAL) == 0)
    return pfns[sel], (flags[sel] & _PAGE_RW) != 0


class PageTableCheck:
    """Per-frame map counts and the checks of mm/page_table_check.c."""

    def __init__(self, k: Kernel) -> None:
        self.k = k
        n = k.mem.nr_frames
        self.anon_map_count = np.zeros(n, dtype=np.int32)
        self.file_map_count = np.zeros(n, dtype=np.int32)

    # -- helpers ---------------------------------------------------------------------------------
    def _anon(self, pfns: np.ndarray) -> np.ndarray:
        """PageAnon() of each page: its folio exists and has PG_ANON."""
        fids = self.k.mem.folio[pfns]
        return (fids >= 0) & (self.k.folios.flags[np.maximum(fids, 0)] & PG_ANON).astype(bool)

    @staticmethod
    def _fail(mm: MM | None, msg: str) -> None:
        who = f"mm {mm.pid}: " if mm is not None else ""
        raise PageTableCheckError(f"page_table_check: {who}{msg}")

    def _folio_pages(self, fid: int, flags: int) -> slice | None:
        """The frames a PMD leaf of ``fid`` maps, or None for the huge zero folio / a special entry."""
        f = self.k.folios
        if fid < 0 or flags & _PAGE_SPECIAL or f.flags[fid] & PG_HUGE_ZERO:
            return None
        head = int(f.head[fid])
        return slice(head, head + (1 << int(f.order[fid])))

    # -- page_table_check_clear() / page_table_check_set() --------------------------------------
    def _clear(self, mm: MM | None, pfns: np.ndarray) -> None:
        if not len(pfns):
            return
        anon = self._anon(pfns)
        for counts, other, sel, kind in ((self.anon_map_count, self.file_map_count, anon, "anon"),
                                         (self.file_map_count, self.anon_map_count, ~anon, "file")):
            p = pfns[sel]
            if not len(p):
                continue
            if other[p].any():
                q = int(p[other[p] != 0][0])
                self._fail(mm, f"clearing a {kind} mapping of pfn {q:#x}, which has {int(other[q])} "
                               f"{'file' if kind == 'anon' else 'anon'} mapping(s)"
                               + ("" if kind == "anon" else " (was its folio freed while mapped?)"))
            u, c = np.unique(p, return_counts=True) if len(p) > 1 else (p, 1)
            new = counts[u] - c
            if (new < 0).any():
                q = int(u[new < 0][0])
                self._fail(mm, f"clearing a {kind} mapping of pfn {q:#x}, which has no {kind} mapping "
                               f"({kind}_map_count would go negative)")
            counts[u] = new

    def _set(self, mm: MM | None, pfns: np.ndarray, rw: np.ndarray) -> None:
        if not len(pfns):
            return
        anon = self._anon(pfns)
        if (~anon).any():
            p = pfns[~anon]
            if self.anon_map_count[p].any():
                q = int(p[self.anon_map_count[p] != 0][0])
                self._fail(mm, f"file mapping of pfn {q:#x}, which has {int(self.anon_map_count[q])} anon mapping(s)")
            np.add.at(self.file_map_count, p, 1)
        p = pfns[anon]
        if not len(p):
            return
        if self.file_map_count[p].any():
            q = int(p[self.file_map_count[p] != 0][0])
            self._fail(mm, f"anon mapping of pfn {q:#x}, which has {int(self.file_map_count[q])} file mapping(s)")
        u, c = np.unique(p, return_counts=True) if len(p) > 1 else (p, 1)
        new = self.anon_map_count[u] + c
        w = p[rw[anon]]                                 # writable ones: must end up mapped once
        if len(w) and (new > 1).any():
            bad = w[np.isin(w, u[new > 1])]
            if len(bad):
                q = int(bad[0])
                self._fail(mm, f"writable mapping of anon pfn {q:#x} (folio {int(self.k.mem.folio[q])}), which is "
                               f"already mapped {int(self.anon_map_count[q])} time(s): a writable anon page must be "
                               f"mapped once")
        self.anon_map_count[u] = new

    # -- one PTE (the scalar fault paths; the same rules with Python ints) -----------------------------
    def _page_is_anon(self, pfn: int) -> bool:
        fid = int(self.k.mem.folio[pfn])
        return fid >= 0 and bool(self.k.folios.flags[fid] & PG_ANON)

    def pte_clear1(self, mm: MM, pfn: int, flags: int) -> None:
        """__page_table_check_pte_clear() for one old entry."""
        if pfn <= ZERO_PFN or flags & _PAGE_SPECIAL:
            return
        if self._page_is_anon(pfn) and not self.file_map_count[pfn] and self.anon_map_count[pfn] > 0:
            self.anon_map_count[pfn] -= 1
        else:                                          # the general path checks and reports
            self._clear(mm, np.array([pfn], dtype=np.int64))

    def pte_replace1(self, mm: MM, old_pfn: int, old_flags: int, pfn: int, flags: int) -> None:
        """__page_table_check_ptes_set() for one entry: un-account the old one, account the new one."""
        self.pte_clear1(mm, old_pfn, old_flags)
        if pfn > ZERO_PFN and not flags & _PAGE_SPECIAL:
            if self._page_is_anon(pfn) and not self.file_map_count[pfn] and \
                    (not flags & _PAGE_RW or not self.anon_map_count[pfn]):
                self.anon_map_count[pfn] += 1
            else:                                      # the general path checks and reports
                self._set(mm, np.array([pfn], dtype=np.int64), np.array([bool(flags & _PAGE_RW)]))

    # -- entry hooks (called by the pgtable writers before they store) -----------------------------
    def ptes_clear(self, mm: MM, pfns, flags) -> None:
        """__page_table_check_pte_clear() for each old entry (or page_table_check_pte_clear_range())."""
        p, _ = _counted(pfns, flags)
        self._clear(mm, p)

    def ptes_set(self, mm: MM, pfns, flags) -> None:
        """The accounting half of __page_table_check_ptes_set() for new entries."""
        self._set(mm, *_counted(pfns, flags))

    def ptes_replace(self, mm: MM, old_pfns, old_flags, pfns, flags) -> None:
        """__page_table_check_ptes_set(): un-account the entries being overwritten, account the new ones."""
        self.ptes_clear(mm, old_pfns, old_flags)
        if np.ndim(pfns) == 0 and np.ndim(old_pfns) > 0:
            pfns = np.broadcast_to(np.int64(pfns), np.shape(old_pfns))
        self.ptes_set(mm, pfns, flags)

    def ptes_mkwrite(self, mm: MM, pfns, flags) -> None:
        """Entries about to become writable: each anon page must be mapped only there."""
        p, rw = _counted(pfns, flags)
        p = p[~rw]
        if not len(p):
            return
        p = p[self._anon(p)]
        bad = p[self.anon_map_count[p] > 1]
        if len(bad):
            q = int(bad[0])
            self._fail(mm, f"making anon pfn {q:#x} (folio {int(self.k.mem.folio[q])}) writable, but it is "
                           f"mapped {int(self.anon_map_count[q])} times: a writable anon page must be mapped once")

    def pmd_clear(self, mm: MM, kind: int, fid: int, flags: int) -> None:
        """__page_table_check_pmd_clear(): un-account an old PMD leaf (tables and none entries map no page)."""
        if kind != PMD_LEAF:
            return
        sl = self._folio_pages(fid, flags)
        if sl is None:
            return
        anon = bool(self.k.folios.flags[fid] & PG_ANON)
        counts, other, what = ((self.anon_map_count, self.file_map_count, "anon") if anon
                               else (self.file_map_count, self.anon_map_count, "file"))
        if other[sl].any():
            self._fail(mm, f"clearing a {what} PMD of folio {fid} (pfn {sl.start:#x}), whose pages have "
                           f"{'file' if anon else 'anon'} mappings")
        seg = counts[sl]
        if (seg <= 0).any():
            q = sl.start + int(np.flatnonzero(seg <= 0)[0])
            self._fail(mm, f"clearing a {what} PMD of folio {fid}: pfn {q:#x} has no {what} mapping "
                           f"({what}_map_count would go negative)")
        seg -= 1

    def pmd_set(self, mm: MM, fid: int, flags: int) -> None:
        """The accounting half of __page_table_check_pmds_set() for a new PMD leaf."""
        sl = self._folio_pages(fid, flags)
        if sl is None:
            return
        anon = bool(self.k.folios.flags[fid] & PG_ANON)
        if not anon:
            if self.anon_map_count[sl].any():
                self._fail(mm, f"file PMD of folio {fid} (pfn {sl.start:#x}), whose pages have anon mappings")
            self.file_map_count[sl] += 1
            return
        if self.file_map_count[sl].any():
            self._fail(mm, f"anon PMD of folio {fid} (pfn {sl.start:#x}), whose pages have file mappings")
        seg = self.anon_map_count[sl]
        if flags & _PAGE_RW and seg.any():
            q = sl.start + int(np.flatnonzero(seg)[0])
            self._fail(mm, f"writable PMD of anon folio {fid}: pfn {q:#x} is already mapped {int(seg.max())} "
                           f"time(s): a writable anon page must be mapped once")
        seg += 1

    def pmd_replace(self, mm: MM, old_kind: int, old_fid: int, old_flags: int, fid: int, flags: int) -> None:
        """__page_table_check_pmds_set(): un-account the old leaf, account the new one."""
        self.pmd_clear(mm, old_kind, old_fid, old_flags)
        self.pmd_set(mm, fid, flags)

    def pmd_mkwrite(self, mm: MM, kind: int, fid: int, flags: int) -> None:
        """A PMD leaf about to become writable: every page of its folio must be mapped only there."""
        if kind != PMD_LEAF or flags & _PAGE_RW:
            return
        sl = self._folio_pages(fid, flags)
        if sl is None or not self.k.folios.flags[fid] & PG_ANON:
            return
        seg = self.anon_map_count[sl]
        if (seg > 1).any():
            q = sl.start + int(np.flatnonzero(seg > 1)[0])
            self._fail(mm, f"making the PMD of anon folio {fid} writable, but pfn {q:#x} is mapped "
                           f"{int(seg[q - sl.start])} times: a writable anon page must be mapped once")

    # -- __page_table_check_zero() --------------------------------------------------------------------
    def check_free(self, pfn: int, nr: int) -> None:
        """Frames [pfn, pfn + nr) go back to the allocator: nothing may map them."""
        sl = slice(pfn, pfn + nr)
        if self.anon_map_count[sl].any() or self.file_map_count[sl].any():
            q = pfn + int(np.flatnonzero(self.anon_map_count[sl] | self.file_map_count[sl])[0])
            self._fail(None, f"pfn {q:#x} is freed while page tables map it "
                             f"(anon {int(self.anon_map_count[q])}, file {int(self.file_map_count[q])})")

    def check_free_pfns(self, pfns: np.ndarray) -> None:
        """check_free() for many order-0 frames."""
        bad = pfns[(self.anon_map_count[pfns] | self.file_map_count[pfns]) != 0]
        if len(bad):
            self.check_free(int(bad[0]), 1)
