"""VMA-level syscalls on Linux 6.18 and on the simulator: return codes and the VMAs left.

Each case is a short program of mmap/munmap/mprotect/mremap/madvise calls and page stores on
a fresh stretch of address space (``base``, 1 GiB aligned, the offsets below relative to it).
It is run twice:

- on the simulator, whose results must equal ``expect``: what Linux 6.18 (the machine these
  tests were written on, THP enabled=madvise, defrag=madvise) returned for the same program;
- on the running kernel, where one is available (realkernel marker), whose results must equal
  the simulator's with the machine's THP knobs copied into it.

A result is the list of the calls' return values (0, an offset for mremap, or an errno name)
and the VMAs left in the stretch: (start, end, perms, VmFlags, AnonHugePages kB, Rss kB).

The cases pin down four rules of 6.18 (kernel functions named in each group):

1. mremap: check_prep_vma() asks a call that maps nothing new (an in-place shrink, a same-size
   call without MREMAP_FIXED/DONTUNMAP) only for a VMA at the old address; a grow or a move
   needs its range in that VMA (for a shrink that moves, only the part kept).  remap_move()
   (MREMAP_FIXED, old_len == new_len) moves every VMA of the range, starting in one.
2. mprotect_fixup() clears VM_ACCOUNT when write permission goes from an anonymous VMA that
   has no anon_vma yet; MAP_NORESERVE sets VM_NORESERVE; both decide which neighbours merge
   (is_mergeable_vma() compares the flags), as does is_mergeable_anon_vma() for a fork child.
3. MADV_COLLAPSE: madvise_walk_vmas() calls madvise_collapse() per VMA with the range clipped
   to it; each VMA is judged and rounded inward on its own; a VMA's error ends the walk and wins
   over the ENOMEM of a hole; an empty PMD entry ends a VMA's walk, a block with no PMD table
   at all does not.
4. madvise_behavior_valid(): which advice values 6.18 accepts; ``behavior`` is an int.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os

import pytest

from thpcow.kernel import (
    MADV_COLLAPSE, MADV_HUGEPAGE, MADV_NOHUGEPAGE, MAP_ANONYMOUS, MAP_NORESERVE, MAP_PRIVATE, Kernel, KernelError,
)
from thpcow.kernel.madvise import madvise_behavior_valid
from thpcow.lab import procfs, programs, scenario
from thpcow.lab.programs import (  # the program language and its two runners
    _SYS_MADVISE, DONTUNMAP, FIXED, G, K, M, MAYMOVE, NONE, RW, R, _libc, _rc, _syscall, run_real, run_sim,
)

from conftest import sim_kernel_with_knobs, skip_without_real_thp

_real_kernel_reason = programs.real_kernel_reason


# -- the programs ---------------------------------------------------------------------------------------
# ("map", lo, hi, prot[, extra mmap flags]), ("touch", lo, hi), ("read", lo, hi), ("prot", lo, hi, prot),
# ("unmap", lo, hi), ("adv", lo, hi, advice), ("remap", lo, old_len, new_len, flags[, new_lo]),
# ("fork",): the rest runs in a child, whose VMAs are the result.

def _two(extra=()):
    """[0, 4K) read-only, [4K, 12K) read-write: two VMAs."""
    return [("map", 0, K, R), ("map", K, 3 * K, RW), *extra]


MREMAP_CASES = {
    "shrink-kept-spans-two-vmas": _two([("remap", 0, 3 * K, 2 * K, 0)]),
    "shrink-kept-spans-two-vmas-maymove": _two([("remap", 0, 3 * K, 2 * K, MAYMOVE)]),
    "shrink-tail-spans-two-vmas": _two([("remap", 0, 3 * K, K, 0)]),
    "shrink-old-range-into-a-hole": [("map", 0, K, RW), ("remap", 0, 4 * K, 2 * K, 0)],
    "shrink-kept-range-into-a-hole": [("map", 0, K, RW), ("remap", 0, 4 * K, 3 * K, 0)],
    "shrink-old-addr-unmapped": [("map", K, 5 * K, RW), ("remap", 0, 4 * K, 2 * K, 0)],
    "same-size-old-addr-unmapped": [("map", 8 * K, 9 * K, RW), ("remap", 0, 2 * K, 2 * K, 0)],
    "same-size-spans-two-vmas": _two([("remap", 0, 3 * K, 3 * K, 0)]),
    "grow-old-spans-two-vmas": _two([("remap", 0, 3 * K, 4 * K, MAYMOVE)]),
    "grow-old-into-a-hole": [("map", 0, K, RW), ("remap", 0, 2 * K, 4 * K, MAYMOVE)],
    "grow-in-place-from-mid-vma": _two([("remap", K, 2 * K, 3 * K, 0)]),
    "zero-old-len-private": [("map", 0, K, RW), ("remap", 0, 0, K, MAYMOVE)],
    "zero-old-len-unmapped": [("map", 8 * K, 9 * K, RW), ("remap", 0, 0, K, MAYMOVE)],
    "fixed-shrink-kept-spans-two-vmas": _two([("remap", 0, 3 * K, 2 * K, MAYMOVE | FIXED, 40 * K)]),
    "fixed-shrink-tail-spans-two-vmas": _two([("touch", K, 3 * K), ("remap", 0, 3 * K, K, MAYMOVE | FIXED, 40 * K)]),
    "fixed-shrink-old-range-into-a-hole": [("map", 0, K, RW), ("touch", 0, K),
                                           ("remap", 0, 3 * K, K, MAYMOVE | FIXED, 40 * K)],
    "fixed-multi-move": _two([("touch", K, 3 * K), ("remap", 0, 3 * K, 3 * K, MAYMOVE | FIXED, 40 * K)]),
    "fixed-multi-move-starts-in-a-hole": [("map", K, 3 * K, RW),
                                          ("remap", 0, 3 * K, 3 * K, MAYMOVE | FIXED, 40 * K)],
    "fixed-multi-move-keeps-what-faces-the-gaps": [
        ("map", 0, K, R), ("map", 2 * K, 3 * K, RW), ("touch", 2 * K, 3 * K), ("map", 40 * K, 48 * K, NONE),
        ("remap", 0, 4 * K, 4 * K, MAYMOVE | FIXED, 40 * K)],
    "dontunmap-fixed-multi-move": _two([("touch", K, 3 * K),
                                        ("remap", 0, 3 * K, 3 * K, MAYMOVE | FIXED | DONTUNMAP, 40 * K)]),
    "dontunmap-spans-two-vmas": _two([("remap", 0, 3 * K, 3 * K, MAYMOVE | DONTUNMAP, 40 * K)]),
    "dontunmap-middle-fixed": [("map", 0, 6 * K, RW), ("touch", 0, 6 * K),
                               ("remap", 2 * K, 2 * K, 2 * K, MAYMOVE | FIXED | DONTUNMAP, 40 * K)],
    "dontunmap-middle-hint": [("map", 0, 6 * K, RW), ("touch", 0, 6 * K),
                              ("remap", 2 * K, 2 * K, 2 * K, MAYMOVE | DONTUNMAP, 40 * K)],
    "dontunmap-whole-then-touch": [("map", 0, 6 * K, RW), ("touch", 0, 6 * K),
                                   ("remap", 0, 6 * K, 6 * K, MAYMOVE | FIXED | DONTUNMAP, 40 * K),
                                   ("touch", 0, K)],
    "dontunmap-hint-overlaps": [("map", 0, 6 * K, RW), ("remap", 0, 4 * K, 4 * K, MAYMOVE | DONTUNMAP, 2 * K)],
    "dontunmap-hint-unaligned": [("map", 0, 6 * K, RW), ("remap", 0, 4 * K, 4 * K, MAYMOVE | DONTUNMAP, 40 * K + 1)],
}

MPROTECT_CASES = {
    "rw-untouched-to-r-then-r-neighbour": [("map", 0, 3 * K, RW), ("prot", 0, 3 * K, R), ("map", 3 * K, 5 * K, R)],
    "rw-written-to-r-then-r-neighbour": [("map", 0, 3 * K, RW), ("touch", 0, K), ("prot", 0, 3 * K, R),
                                         ("map", 3 * K, 5 * K, R)],
    "rw-read-to-r-then-r-neighbour": [("map", 0, 3 * K, RW), ("read", 0, 3 * K), ("prot", 0, 3 * K, R),
                                      ("map", 3 * K, 5 * K, R)],
    "rw-untouched-middle-r-then-rw": [("map", 0, 3 * K, RW), ("prot", K, 2 * K, R), ("prot", K, 2 * K, RW)],
    "rw-untouched-middle-r": [("map", 0, 3 * K, RW), ("prot", K, 2 * K, R)],
    "noreserve-rw-r-rw": [("map", 0, 3 * K, RW, MAP_NORESERVE), ("prot", 0, 3 * K, R), ("prot", 0, 3 * K, RW)],
    "noreserve-r-next-to-r": [("map", 0, 2 * K, R, MAP_NORESERVE), ("map", 2 * K, 4 * K, R)],
    "r-untouched-middle-rw": [("map", 0, 3 * K, R), ("prot", K, 2 * K, RW)],
    "r-then-rw-untouched-to-r": [("map", 0, 2 * K, R), ("map", 2 * K, 4 * K, RW), ("prot", 2 * K, 4 * K, R)],
    "r-then-rw-written-to-r": [("map", 0, 2 * K, R), ("map", 2 * K, 4 * K, RW), ("touch", 2 * K, 3 * K),
                               ("prot", 2 * K, 4 * K, R)],
    "rw-untouched-to-none": [("map", 0, 2 * K, RW), ("prot", 0, 2 * K, NONE)],
    "rw-untouched-r-rw-then-rw-neighbour": [("map", 0, 2 * K, RW), ("prot", 0, 2 * K, R), ("prot", 0, 2 * K, RW),
                                            ("map", 2 * K, 4 * K, RW)],
    "hole-in-range": [("map", 0, K, RW), ("map", 2 * K, 3 * K, RW), ("prot", 0, 3 * K, R)],
    "fork-child-maps-next-to-written-vma": [("map", 0, 2 * K, RW), ("touch", 0, K), ("fork",),
                                            ("map", 2 * K, 4 * K, RW)],
    "fork-child-maps-next-to-unwritten-vma": [("map", 0, 2 * K, RW), ("fork",), ("map", 2 * K, 4 * K, RW)],
    "fork-child-splits-and-remerges": [("map", 0, 4 * K, RW), ("touch", 0, K), ("fork",), ("prot", 2 * K, 4 * K, R),
                                       ("prot", 2 * K, 4 * K, RW)],
    "fork-child-unfaulted-neighbour-matches-flags": [("map", 0, 2 * K, RW), ("prot", K, 2 * K, R), ("touch", 0, K),
                                                     ("fork",), ("prot", K, 2 * K, RW)],
    "parent-unfaulted-neighbour-matches-flags": [("map", 0, 2 * K, RW), ("prot", K, 2 * K, R), ("touch", 0, K),
                                                 ("prot", K, 2 * K, RW)],
}


def _vma(lo, hi, prot=RW, touched=True, advice=None):
    """A VMA [lo, hi): mapped, advised, every 4 KiB page stored to (or not), then mprotect()ed."""
    steps = [("map", lo, hi, RW)]
    if advice is not None:
        steps.append(("adv", lo, hi, advice))
    if touched:
        steps.append(("touch", lo, hi))
    if prot != RW:
        steps.append(("prot", lo, hi, prot))
    return steps


def _collapse(lo, hi):
    return [("adv", lo, hi, MADV_COLLAPSE)]


COLLAPSE_CASES = {
    "straddle": _vma(0, 3 * M) + _vma(3 * M, 6 * M, R) + _collapse(0, 6 * M),
    "hole-between": _vma(0, 2 * M) + _vma(3 * M, 6 * M, R) + _collapse(0, 6 * M),
    "hole-then-nohugepage-vma": _vma(0, 2 * M) + _vma(4 * M, 6 * M, advice=MADV_NOHUGEPAGE) + _collapse(0, 6 * M),
    "nohugepage-vma-first": _vma(0, 2 * M, advice=MADV_NOHUGEPAGE) + _vma(2 * M, 4 * M) + _collapse(0, 4 * M),
    "empty-pmd-in-first-vma": _vma(0, 4 * M, touched=False) + [("touch", 0, 2 * M)] + _vma(4 * M, 6 * M, R)
    + _collapse(0, 6 * M),
    "empty-pmd-mid-vma": _vma(0, 6 * M, touched=False) + [("touch", 0, 2 * M), ("touch", 4 * M, 6 * M)]
    + _collapse(0, 6 * M),
    "small-vma-after": _vma(0, 2 * M) + _vma(2 * M, 3 * M, R) + _collapse(0, 3 * M),
    "small-vma-first": _vma(M, 2 * M, R) + _vma(2 * M, 4 * M) + _collapse(M, 4 * M),
    "range-starts-in-a-hole": _vma(2 * M, 4 * M) + _collapse(0, 4 * M),
    "range-past-every-vma": _vma(0, 2 * M) + _collapse(14 * M, 16 * M),
    "untouched-second-vma": _vma(0, 2 * M) + _vma(2 * M, 4 * M, R, touched=False) + _collapse(0, 4 * M),
    "end-inside-second-vma-block": _vma(0, 2 * M) + _vma(2 * M, 6 * M, R) + _collapse(0, 3 * M + M // 2),
    "start-inside-first-vma-block": _vma(0, 4 * M) + _vma(4 * M, 6 * M, R) + _collapse(2 * M + M // 2, 6 * M),
    "subblock-range": _vma(0, 4 * M) + _vma(4 * M, 6 * M, R) + _collapse(2 * M + M // 2, 3 * M),
    "first-vma-rounds-to-nothing": _vma(0, 3 * M) + _vma(3 * M, 6 * M, R) + _collapse(2 * M + M // 2, 6 * M),
    "hole-and-empty-pmd": _vma(0, 4 * M, touched=False) + [("touch", 0, 2 * M)] + _vma(6 * M, 8 * M)
    + _collapse(0, 8 * M),
    "thp-and-small-pages": _vma(0, 2 * M, advice=MADV_HUGEPAGE) + _vma(2 * M, 4 * M, R) + _collapse(0, 4 * M),
    # one VMA across a 1 GiB boundary: the 512 blocks of [1G, 2G) have no PMD table (SCAN_PMD_NULL)
    "no-pmd-table-between": [("map", G - 2 * M, 2 * G + 2 * M, RW), ("touch", G - 2 * M, G),
                             ("touch", 2 * G, 2 * G + 2 * M)] + _collapse(G - 2 * M, 2 * G + 2 * M),
    "empty-pmd-entry-between": [("map", G - 2 * M, G + 4 * M, RW), ("touch", G - 2 * M, G),
                                ("touch", G + 2 * M, G + 4 * M)] + _collapse(G - 2 * M, G + 4 * M),
}


# What Linux 6.18.44 returned for each program (recorded with run_real() on the machine named in
# kernel-semantics.md, THP enabled=madvise, defrag=madvise): (return values, VMAs left).
EXPECT = {
    # MREMAP_CASES
    'shrink-kept-spans-two-vmas': ([0, 0, 0], [
        (0, 0x1000, 'r--p', 'rd mr mw me', 0, 0),
        (0x1000, 0x2000, 'rw-p', 'rd wr mr mw me ac', 0, 0),
    ]),
    'shrink-kept-spans-two-vmas-maymove': ([0, 0, 0], [
        (0, 0x1000, 'r--p', 'rd mr mw me', 0, 0),
        (0x1000, 0x2000, 'rw-p', 'rd wr mr mw me ac', 0, 0),
    ]),
    'shrink-tail-spans-two-vmas': ([0, 0, 0], [(0, 0x1000, 'r--p', 'rd mr mw me', 0, 0)]),
    'shrink-old-range-into-a-hole': ([0, 0], [(0, 0x1000, 'rw-p', 'rd wr mr mw me ac', 0, 0)]),
    'shrink-kept-range-into-a-hole': ([0, 0], [(0, 0x1000, 'rw-p', 'rd wr mr mw me ac', 0, 0)]),
    'shrink-old-addr-unmapped': ([0, 'EFAULT'], [(0x1000, 0x5000, 'rw-p', 'rd wr mr mw me ac', 0, 0)]),
    'same-size-old-addr-unmapped': ([0, 'EFAULT'], [(0x8000, 0x9000, 'rw-p', 'rd wr mr mw me ac', 0, 0)]),
    'same-size-spans-two-vmas': ([0, 0, 0], [
        (0, 0x1000, 'r--p', 'rd mr mw me', 0, 0),
        (0x1000, 0x3000, 'rw-p', 'rd wr mr mw me ac', 0, 0),
    ]),
    'grow-old-spans-two-vmas': ([0, 0, 'EFAULT'], [
        (0, 0x1000, 'r--p', 'rd mr mw me', 0, 0),
        (0x1000, 0x3000, 'rw-p', 'rd wr mr mw me ac', 0, 0),
    ]),
    'grow-old-into-a-hole': ([0, 'EFAULT'], [(0, 0x1000, 'rw-p', 'rd wr mr mw me ac', 0, 0)]),
    'grow-in-place-from-mid-vma': ([0, 0, 0x1000], [
        (0, 0x1000, 'r--p', 'rd mr mw me', 0, 0),
        (0x1000, 0x4000, 'rw-p', 'rd wr mr mw me ac', 0, 0),
    ]),
    'zero-old-len-private': ([0, 'EINVAL'], [(0, 0x1000, 'rw-p', 'rd wr mr mw me ac', 0, 0)]),
    'zero-old-len-unmapped': ([0, 'EFAULT'], [(0x8000, 0x9000, 'rw-p', 'rd wr mr mw me ac', 0, 0)]),
    'fixed-shrink-kept-spans-two-vmas': ([0, 0, 'EFAULT'], [
        (0, 0x1000, 'r--p', 'rd mr mw me', 0, 0),
        (0x1000, 0x3000, 'rw-p', 'rd wr mr mw me ac', 0, 0),
    ]),
    'fixed-shrink-tail-spans-two-vmas': ([0, 0, 0x28000], [(0x28000, 0x29000, 'r--p', 'rd mr mw me', 0, 0)]),
    'fixed-shrink-old-range-into-a-hole': ([0, 0x28000], [(0x28000, 0x29000, 'rw-p', 'rd wr mr mw me ac', 0, 4)]),
    'fixed-multi-move': ([0, 0, 0x28000], [
        (0x28000, 0x29000, 'r--p', 'rd mr mw me', 0, 0),
        (0x29000, 0x2b000, 'rw-p', 'rd wr mr mw me ac', 0, 8),
    ]),
    'fixed-multi-move-starts-in-a-hole': ([0, 'EFAULT'], [(0x1000, 0x3000, 'rw-p', 'rd wr mr mw me ac', 0, 0)]),
    'fixed-multi-move-keeps-what-faces-the-gaps': ([0, 0, 0, 0x28000], [
        (0x28000, 0x29000, 'r--p', 'rd mr mw me', 0, 0),
        (0x29000, 0x2a000, '---p', 'mr mw me', 0, 0),
        (0x2a000, 0x2b000, 'rw-p', 'rd wr mr mw me ac', 0, 4),
        (0x2b000, 0x30000, '---p', 'mr mw me', 0, 0),
    ]),
    'dontunmap-fixed-multi-move': ([0, 0, 0x28000], [
        (0, 0x1000, 'r--p', 'rd mr mw me', 0, 0),
        (0x1000, 0x3000, 'rw-p', 'rd wr mr mw me ac', 0, 0),
        (0x28000, 0x29000, 'r--p', 'rd mr mw me', 0, 0),
        (0x29000, 0x2b000, 'rw-p', 'rd wr mr mw me ac', 0, 8),
    ]),
    'dontunmap-spans-two-vmas': ([0, 0, 'EFAULT'], [
        (0, 0x1000, 'r--p', 'rd mr mw me', 0, 0),
        (0x1000, 0x3000, 'rw-p', 'rd wr mr mw me ac', 0, 0),
    ]),
    'dontunmap-middle-fixed': ([0, 0x28000], [
        (0, 0x6000, 'rw-p', 'rd wr mr mw me ac', 0, 16),
        (0x28000, 0x2a000, 'rw-p', 'rd wr mr mw me ac', 0, 8),
    ]),
    'dontunmap-middle-hint': ([0, 0x28000], [
        (0, 0x6000, 'rw-p', 'rd wr mr mw me ac', 0, 16),
        (0x28000, 0x2a000, 'rw-p', 'rd wr mr mw me ac', 0, 8),
    ]),
    'dontunmap-whole-then-touch': ([0, 0x28000], [
        (0, 0x6000, 'rw-p', 'rd wr mr mw me ac', 0, 4),
        (0x28000, 0x2e000, 'rw-p', 'rd wr mr mw me ac', 0, 24),
    ]),
    'dontunmap-hint-overlaps': ([0, 'EINVAL'], [(0, 0x6000, 'rw-p', 'rd wr mr mw me ac', 0, 0)]),
    'dontunmap-hint-unaligned': ([0, 'EINVAL'], [(0, 0x6000, 'rw-p', 'rd wr mr mw me ac', 0, 0)]),
    # MPROTECT_CASES
    'rw-untouched-to-r-then-r-neighbour': ([0, 0, 0], [(0, 0x5000, 'r--p', 'rd mr mw me', 0, 0)]),
    'rw-written-to-r-then-r-neighbour': ([0, 0, 0], [
        (0, 0x3000, 'r--p', 'rd mr mw me ac', 0, 4),
        (0x3000, 0x5000, 'r--p', 'rd mr mw me', 0, 0),
    ]),
    'rw-read-to-r-then-r-neighbour': ([0, 0, 0], [(0, 0x5000, 'r--p', 'rd mr mw me', 0, 0)]),
    'rw-untouched-middle-r-then-rw': ([0, 0, 0], [(0, 0x3000, 'rw-p', 'rd wr mr mw me ac', 0, 0)]),
    'rw-untouched-middle-r': ([0, 0], [
        (0, 0x1000, 'rw-p', 'rd wr mr mw me ac', 0, 0),
        (0x1000, 0x2000, 'r--p', 'rd mr mw me', 0, 0),
        (0x2000, 0x3000, 'rw-p', 'rd wr mr mw me ac', 0, 0),
    ]),
    'noreserve-rw-r-rw': ([0, 0, 0], [(0, 0x3000, 'rw-p', 'rd wr mr mw me nr', 0, 0)]),
    'noreserve-r-next-to-r': ([0, 0], [
        (0, 0x2000, 'r--p', 'rd mr mw me nr', 0, 0),
        (0x2000, 0x4000, 'r--p', 'rd mr mw me', 0, 0),
    ]),
    'r-untouched-middle-rw': ([0, 0], [
        (0, 0x1000, 'r--p', 'rd mr mw me', 0, 0),
        (0x1000, 0x2000, 'rw-p', 'rd wr mr mw me ac', 0, 0),
        (0x2000, 0x3000, 'r--p', 'rd mr mw me', 0, 0),
    ]),
    'r-then-rw-untouched-to-r': ([0, 0, 0], [(0, 0x4000, 'r--p', 'rd mr mw me', 0, 0)]),
    'r-then-rw-written-to-r': ([0, 0, 0], [
        (0, 0x2000, 'r--p', 'rd mr mw me', 0, 0),
        (0x2000, 0x4000, 'r--p', 'rd mr mw me ac', 0, 4),
    ]),
    'rw-untouched-to-none': ([0, 0], [(0, 0x2000, '---p', 'mr mw me', 0, 0)]),
    'rw-untouched-r-rw-then-rw-neighbour': ([0, 0, 0, 0], [(0, 0x4000, 'rw-p', 'rd wr mr mw me ac', 0, 0)]),
    'hole-in-range': ([0, 0, 'ENOMEM'], [
        (0, 0x1000, 'r--p', 'rd mr mw me', 0, 0),
        (0x2000, 0x3000, 'rw-p', 'rd wr mr mw me ac', 0, 0),
    ]),
    'fork-child-maps-next-to-written-vma': ([0, 0], [
        (0, 0x2000, 'rw-p', 'rd wr mr mw me ac', 0, 4),
        (0x2000, 0x4000, 'rw-p', 'rd wr mr mw me ac', 0, 0),
    ]),
    'fork-child-maps-next-to-unwritten-vma': ([0, 0], [(0, 0x4000, 'rw-p', 'rd wr mr mw me ac', 0, 0)]),
    'fork-child-unfaulted-neighbour-matches-flags': ([0, 0, 0], [
        (0, 0x1000, 'rw-p', 'rd wr mr mw me ac', 0, 4),
        (0x1000, 0x2000, 'rw-p', 'rd wr mr mw me ac', 0, 0),
    ]),
    'parent-unfaulted-neighbour-matches-flags': ([0, 0, 0], [(0, 0x2000, 'rw-p', 'rd wr mr mw me ac', 0, 4)]),
    'fork-child-splits-and-remerges': ([0, 0, 0], [(0, 0x4000, 'rw-p', 'rd wr mr mw me ac', 0, 4)]),
    # COLLAPSE_CASES
    'straddle': ([0, 0, 0, 0], [
        (0, 0x300000, 'rw-p', 'rd wr mr mw me ac', 2048, 3072),
        (0x300000, 0x600000, 'r--p', 'rd mr mw me ac', 2048, 3072),
    ]),
    'hole-between': ([0, 0, 0, 'ENOMEM'], [
        (0, 0x200000, 'rw-p', 'rd wr mr mw me ac', 2048, 2048),
        (0x300000, 0x600000, 'r--p', 'rd mr mw me ac', 2048, 3072),
    ]),
    'hole-then-nohugepage-vma': ([0, 0, 0, 'EINVAL'], [
        (0, 0x200000, 'rw-p', 'rd wr mr mw me ac', 2048, 2048),
        (0x400000, 0x600000, 'rw-p', 'rd wr mr mw me ac nh', 0, 2048),
    ]),
    'nohugepage-vma-first': ([0, 0, 0, 'EINVAL'], [
        (0, 0x200000, 'rw-p', 'rd wr mr mw me ac nh', 0, 2048),
        (0x200000, 0x400000, 'rw-p', 'rd wr mr mw me ac', 0, 2048),
    ]),
    'empty-pmd-in-first-vma': ([0, 0, 0, 'EINVAL'], [
        (0, 0x400000, 'rw-p', 'rd wr mr mw me ac', 2048, 2048),
        (0x400000, 0x600000, 'r--p', 'rd mr mw me ac', 0, 2048),
    ]),
    'empty-pmd-mid-vma': ([0, 'EINVAL'], [(0, 0x600000, 'rw-p', 'rd wr mr mw me ac', 2048, 4096)]),
    'small-vma-after': ([0, 0, 0, 'EINVAL'], [
        (0, 0x200000, 'rw-p', 'rd wr mr mw me ac', 2048, 2048),
        (0x200000, 0x300000, 'r--p', 'rd mr mw me ac', 0, 1024),
    ]),
    'small-vma-first': ([0, 0, 0, 'EINVAL'], [
        (0x100000, 0x200000, 'r--p', 'rd mr mw me ac', 0, 1024),
        (0x200000, 0x400000, 'rw-p', 'rd wr mr mw me ac', 0, 2048),
    ]),
    'range-starts-in-a-hole': ([0, 'ENOMEM'], [(0x200000, 0x400000, 'rw-p', 'rd wr mr mw me ac', 2048, 2048)]),
    'range-past-every-vma': ([0, 'ENOMEM'], [(0, 0x200000, 'rw-p', 'rd wr mr mw me ac', 0, 2048)]),
    'untouched-second-vma': ([0, 0, 0, 'EINVAL'], [
        (0, 0x200000, 'rw-p', 'rd wr mr mw me ac', 2048, 2048),
        (0x200000, 0x400000, 'r--p', 'rd mr mw me ac', 0, 0),
    ]),
    'end-inside-second-vma-block': ([0, 0, 0, 0], [
        (0, 0x200000, 'rw-p', 'rd wr mr mw me ac', 2048, 2048),
        (0x200000, 0x600000, 'r--p', 'rd mr mw me ac', 0, 4096),
    ]),
    'start-inside-first-vma-block': ([0, 0, 0, 0], [
        (0, 0x400000, 'rw-p', 'rd wr mr mw me ac', 0, 4096),
        (0x400000, 0x600000, 'r--p', 'rd mr mw me ac', 2048, 2048),
    ]),
    'subblock-range': ([0, 0, 0, 'EINVAL'], [
        (0, 0x400000, 'rw-p', 'rd wr mr mw me ac', 0, 4096),
        (0x400000, 0x600000, 'r--p', 'rd mr mw me ac', 0, 2048),
    ]),
    'first-vma-rounds-to-nothing': ([0, 0, 0, 'EINVAL'], [
        (0, 0x300000, 'rw-p', 'rd wr mr mw me ac', 0, 3072),
        (0x300000, 0x600000, 'r--p', 'rd mr mw me ac', 0, 3072),
    ]),
    'hole-and-empty-pmd': ([0, 0, 'EINVAL'], [
        (0, 0x400000, 'rw-p', 'rd wr mr mw me ac', 2048, 2048),
        (0x600000, 0x800000, 'rw-p', 'rd wr mr mw me ac', 0, 2048),
    ]),
    'thp-and-small-pages': ([0, 0, 0, 0, 0], [
        (0, 0x200000, 'rw-p', 'rd wr mr mw me ac hg', 2048, 2048),
        (0x200000, 0x400000, 'r--p', 'rd mr mw me ac', 2048, 2048),
    ]),
    'no-pmd-table-between': ([0, 'EINVAL'], [(0x3fe00000, 0x80200000, 'rw-p', 'rd wr mr mw me ac', 4096, 4096)]),
    'empty-pmd-entry-between': ([0, 'EINVAL'], [(0x3fe00000, 0x40400000, 'rw-p', 'rd wr mr mw me ac', 2048, 4096)]),
}

ALL_CASES = {**MREMAP_CASES, **MPROTECT_CASES, **COLLAPSE_CASES}


def _as_expect(result: dict) -> tuple[list, list[tuple]]:
    return result["rcs"], [tuple(v) for v in result["vmas"]]


def test_every_case_has_a_recorded_result() -> None:
    assert set(EXPECT) == set(ALL_CASES)


@pytest.mark.parametrize("name", list(ALL_CASES))
def test_simulator_returns_what_linux_6_18_returned(name: str) -> None:
    assert _as_expect(run_sim(ALL_CASES[name])) == EXPECT[name]


@pytest.mark.realkernel
@pytest.mark.parametrize("name", list(ALL_CASES))
def test_running_kernel_and_simulator_agree(name: str) -> None:
    reason = _real_kernel_reason()
    if reason:
        pytest.skip(reason)
    program = ALL_CASES[name]
    collapse = name in COLLAPSE_CASES
    if collapse:
        skip_without_real_thp()
    knobs = procfs.read_thp_knobs()
    with scenario.lab_lock():
        before = procfs.read_vmstat()
        real = run_real(program)
        after = procfs.read_vmstat()
    if collapse and after.get("thp_collapse_alloc_failed", 0) > before.get("thp_collapse_alloc_failed", 0):
        pytest.skip("a THP allocation for MADV_COLLAPSE failed on the running kernel (memory fragmented?)")
    sim = run_sim(program, sim_kernel_with_knobs(knobs, ram=1 << 30)[0])
    assert real == sim, json.dumps({"real": real, "sim": sim, "knobs": knobs})


# -- 4. which advice values 6.18 accepts ------------------------------------------------------------------
ADVICE_RANGE = list(range(-2, 320)) + [1 << 16, (1 << 31) - 1]
# madvise_behavior_valid() of 6.18 with CONFIG_KSM, CONFIG_TRANSPARENT_HUGEPAGE and without
# CONFIG_MEMORY_FAILURE (no MADV_HWPOISON 100, MADV_SOFT_OFFLINE 101), as on this machine.
ACCEPTED_6_18 = {0, 1, 2, 3, 4, *range(8, 26), 102, 103}
# A 4-page written mapping: what each advice returned on Linux 6.18 (everything else EINVAL:
# unknown advice, MADV_REMOVE on private anonymous memory, MADV_COLLAPSE of a VMA below 2 MiB).
NOT_EINVAL_6_18 = {0, 1, 2, 3, 4, *range(8, 25), 102, 103} - {9}


def test_valid_advice_is_6_18s_and_the_series_adds_256_and_257() -> None:
    """Without the series, madvise_behavior_valid() takes 6.18's values; the series' patch 1
    adds MADV_THP_SETUP_BASE <= behavior < MADV_THP_SETUP_END: 256 (no flag) and 257
    (MADV_THP_COW), as posted (v1) and as meant."""
    plain = Kernel(ram=1 << 30, series_thp_cow=False)
    assert {a for a in ADVICE_RANGE if madvise_behavior_valid(plain, a)} == ACCEPTED_6_18
    for series in ("v1", "meant"):
        k = Kernel(ram=1 << 30, series_thp_cow=series)
        assert {a for a in ADVICE_RANGE if madvise_behavior_valid(k, a)} == ACCEPTED_6_18 | {256, 257}


def _sim_advice_outcomes(advice_values) -> dict[int, int | str]:
    k = Kernel(ram=1 << 30, check=True, series_thp_cow=False)
    p = k.spawn()
    out = {}
    for advice in advice_values:
        a = p.mmap(4 * K)
        p.write(a, 4 * K, 1)
        try:
            p.madvise(a, 4 * K, advice)
            out[advice] = 0
        except KernelError as e:
            out[advice] = errno.errorcode[e.errno]
        p.munmap(a, 4 * K)
    return out


def test_unknown_advice_is_einval_as_on_6_18() -> None:
    out = _sim_advice_outcomes(ADVICE_RANGE)
    assert {a for a, r in out.items() if r != "EINVAL"} == NOT_EINVAL_6_18


def _real_advice_outcomes(advice_values) -> dict[int, int | str]:
    out = {}
    for advice in advice_values:
        a = _libc.mmap(None, 4 * K, RW, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        ctypes.memset(a, 1, 4 * K)
        out[advice] = _rc(_syscall(_SYS_MADVISE, a, 4 * K, advice))
        _libc.munmap(a, 4 * K)
    return out


@pytest.mark.realkernel
def test_advice_outcomes_match_the_running_kernel() -> None:
    reason = _real_kernel_reason()
    if reason:
        pytest.skip(reason)
    real = _real_advice_outcomes(ADVICE_RANGE)
    assert {a for a, r in real.items() if r != "EINVAL"} == NOT_EINVAL_6_18, real
    assert _sim_advice_outcomes(ADVICE_RANGE) == real


@pytest.mark.parametrize("high", [1 << 32, 1 << 40])
def test_advice_is_an_int(high: int) -> None:
    """SYSCALL_DEFINE3(madvise, ..., int, behavior): only the low 32 bits count, signed;
    (1 << 31) + MADV_DONTNEED is negative, hence EINVAL (Linux 6.18 did the same)."""
    k = Kernel(ram=1 << 30, check=True)
    p = k.spawn()
    a = p.mmap(4 * K)
    p.write(a, 4 * K, 1)
    p.madvise(a, 4 * K, high + 4)                               # MADV_DONTNEED
    assert p.smaps_fields(a)["Rss"] == 0
    p.madvise(a, 4 * K, high + MADV_HUGEPAGE)
    assert "hg" in p.smaps().split("VmFlags:")[1].split("\n")[0]
    with pytest.raises(KernelError) as ei:
        p.madvise(a, 4 * K, (1 << 31) + 4)
    assert ei.value.errno == errno.EINVAL


@pytest.mark.realkernel
def test_advice_is_an_int_on_the_running_kernel() -> None:
    reason = _real_kernel_reason()
    if reason:
        pytest.skip(reason)
    guarded = _libc.mmap(None, 6 * K, NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)   # a VMA of its own
    a = guarded + K
    try:
        assert _libc.mprotect(a, 4 * K, RW) == 0
        ctypes.memset(a, 1, 4 * K)
        assert _rc(_syscall(_SYS_MADVISE, a, 4 * K, (1 << 32) + 4)) == 0
        (v,) = [v for v in procfs.read_smaps(os.getpid()) if v.start == a]
        assert v.fields["Rss"] == 0
        assert _rc(_syscall(_SYS_MADVISE, a, 4 * K, (1 << 31) + 4)) == "EINVAL"
    finally:
        _libc.munmap(guarded, 6 * K)
