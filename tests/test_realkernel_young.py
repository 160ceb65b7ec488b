"""Validation: the accessed (young) bit and pagemap's PM_MMAP_EXCLUSIVE, on the running kernel
and on the simulator.

The same two programs run on both sides (kernel-semantics.md §1.2, §9.1, §9.2), each on
2 MiB regions of its own process (madvise(MADV_HUGEPAGE) or MADV_NOHUGEPAGE, one VMA each),
and every observation must be equal:

1. ``REFERENCED``: smaps ``Referenced`` (and ``Rss``) of a region after stores, MADV_COLD,
   loads (2 MiB, then one page: a young PMD counts its whole THP), fork (the child's entries
   are old, the parent's stay young; a load in the child makes them young again), MADV_COLD on
   memory shared with a child (skipped) and after the child is gone, and loads of the huge
   zero page and the zero page (special: not counted).
2. ``EXCLUSIVE``: pagemap bit 56 (PM_MMAP_EXCLUSIVE), which on this kernel
   (CONFIG_PAGE_MAPCOUNT) means "this page's precise mapcount is 1": a PMD-mapped THP before
   fork, after fork, after the child's partial COW of page 1 (the parent's PMD reports the head
   page: shared), of page 0 (the head is now mapped once: every page of the parent's PMD is
   exclusive), a PTE-mapped THP shared with a child whose page 5 the child COWs (page by page:
   only page 5 is exclusive in the parent), after the child's exit, and the huge zero page
   (present, PM_FILE, never exclusive) and the zero page (present only).

Nothing here reads system-wide counters: smaps and pagemap are this process's (and the child's
own, read by the child).  The real runs take scenario.lab_lock() so that they do not disturb
the vmstat measurements of the other real-kernel tests.  Nothing writes sysfs.
"""

from __future__ import annotations

import ctypes
import json
import os

import pytest

from thpcow.kernel import (
    HPAGE_PMD_SIZE, MADV_COLD, MADV_HUGEPAGE, MADV_NOHUGEPAGE, PAGE_SIZE, PROT_READ, PROT_WRITE,
)
from thpcow.lab import calibrate, procfs, scenario

from conftest import NR, aligned_region, sim_kernel_with_knobs, skip_without_real_thp

ADVICE = {"cold": MADV_COLD, "nohuge": MADV_NOHUGEPAGE, "huge": MADV_HUGEPAGE}


def _not_x86_64_sizes() -> str | None:
    if procfs.hpage_pmd_size() != HPAGE_PMD_SIZE or procfs.PAGE_SIZE != PAGE_SIZE:
        return f"the simulator models x86-64 (2 MiB PMDs, 4 KiB pages), not {procfs.hpage_pmd_size()}"
    return None


class NoThp(Exception):
    """The running kernel gave a region no THP (fragmentation, a per-process prctl): skip."""


def runs(pages: list[int]) -> str:
    """Sorted page indexes as comma-separated runs: [0, 1, 2, 5] -> "0-2,5"; [] -> ""."""
    out, i = [], 0
    while i < len(pages):
        j = i
        while j + 1 < len(pages) and pages[j + 1] == pages[j] + 1:
            j += 1
        out.append(str(pages[i]) if i == j else f"{pages[i]}-{pages[j]}")
        i = j + 1
    return ",".join(out)


# -- the two sides ---------------------------------------------------------------------------------
class Side:
    """One process of one side.  ``do(op, *args)`` runs one step and returns what it observed."""

    def do(self, op: str, *args):
        return getattr(self, "op_" + op)(*args)

    def op_excl(self, name: str) -> str:
        """The pages of the region whose pagemap entry has PM_MMAP_EXCLUSIVE, as runs ("0-511", "5")."""
        pm = self.pagemap(name)
        return runs([i for i in range(NR) if pm[i] >> 56 & 1])

    def op_bits(self, name: str) -> str:
        """present, PM_FILE and PM_MMAP_EXCLUSIVE of the region's pages 0, 1 and 511 ("110 110 110")."""
        pm = self.pagemap(name)
        return " ".join(f"{pm[i] >> 63 & 1}{pm[i] >> 61 & 1}{pm[i] >> 56 & 1}" for i in (0, 1, NR - 1))


class RealSide(Side):
    """This process on the running kernel; regions are calibrate.Region (one VMA each)."""

    def __init__(self, regions: dict | None = None) -> None:
        self.regions: dict[str, calibrate.Region] = {} if regions is None else regions
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

    def close(self) -> None:
        for r in self.regions.values():
            r.close()

    def op_map(self, name: str, backing: str) -> None:
        self.regions[name] = calibrate.Region(HPAGE_PMD_SIZE, backing)

    def op_write(self, name: str, first: int, n: int) -> None:
        self.regions[name].buf[first * PAGE_SIZE: (first + n) * PAGE_SIZE: PAGE_SIZE] = 7

    def op_read(self, name: str, first: int, n: int) -> int:
        return int(self.regions[name].buf[first * PAGE_SIZE: (first + n) * PAGE_SIZE: PAGE_SIZE].sum())

    def op_madvise(self, name: str, advice: str) -> None:
        r = self.regions[name]
        calibrate.sys_madvise(r.addr, r.size, ADVICE[advice])

    def op_mprotect_trick(self, name: str) -> None:
        """mprotect(page 1, PROT_READ) and back: the PMD is split, the THP stays (cow.c's T3)."""
        addr = self.regions[name].addr + PAGE_SIZE
        for prot in (PROT_READ, PROT_READ | PROT_WRITE):
            if self._libc.mprotect(addr, PAGE_SIZE, prot) != 0:
                raise OSError(ctypes.get_errno(), "mprotect")

    def op_field(self, name: str, field: str) -> int:
        r = self.regions[name]
        return procfs.smaps_field_in_range(procfs.read_smaps("self"), r.addr, r.addr + r.size, field)

    def pagemap(self, name: str) -> list[int]:
        return [int(x) for x in procfs.read_pagemap("self", self.regions[name].addr, NR)]

    def fork(self) -> "RealChild":
        return RealChild(self.regions)


class RealChild:
    """A forked child of this process running the steps it is sent (JSON lines over pipes)."""

    def __init__(self, regions: dict) -> None:
        cmd_r, self.cmd_w = os.pipe()
        self.rep_r, rep_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:                               # the child: never returns
            status = 1
            try:
                os.close(self.cmd_w)
                os.close(self.rep_r)
                side = RealSide(regions)
                with os.fdopen(cmd_r, "r") as cmds:
                    for line in cmds:
                        try:
                            reply = {"ok": side.do(*json.loads(line))}
                        except Exception as e:  # noqa: BLE001 - reported to the parent
                            reply = {"error": f"{type(e).__name__}: {e}"}
                        os.write(rep_w, json.dumps(reply).encode() + b"\n")
                status = 0
            finally:
                os._exit(status)
        os.close(cmd_r)
        os.close(rep_w)
        self._rep = os.fdopen(self.rep_r, "r")

    def do(self, op: str, *args):
        os.write(self.cmd_w, json.dumps([op, *args]).encode() + b"\n")
        reply = json.loads(self._rep.readline() or '{"error": "the child died"}')
        if "error" in reply:
            raise procfs.LabError(f"child {self.pid}: {op}{args}: {reply['error']}")
        return reply["ok"]

    def exit(self) -> None:
        os.close(self.cmd_w)
        self._rep.close()
        _, status = os.waitpid(self.pid, 0)
        if status != 0:
            raise procfs.LabError(f"child {self.pid} exited with wait status {status}")


class SimSide(Side):
    """A process of a simulated kernel that has the running kernel's THP knobs."""

    def __init__(self, proc, addrs: dict[str, int]) -> None:
        self.p, self.addrs = proc, addrs

    @classmethod
    def boot(cls, knobs: dict[str, str]) -> "SimSide":
        k, _ = sim_kernel_with_knobs(knobs, ram=512 << 20)
        return cls(k.spawn(), {})

    def op_map(self, name: str, backing: str) -> None:
        self.addrs[name] = aligned_region(self.p, HPAGE_PMD_SIZE,
                                          MADV_HUGEPAGE if backing == "thp" else MADV_NOHUGEPAGE)

    def _pages(self, name: str, first: int, n: int):
        return [self.addrs[name] + (first + i) * PAGE_SIZE for i in range(n)]

    def op_write(self, name: str, first: int, n: int) -> None:
        self.p.write_many(self._pages(name, first, n), 7)

    def op_read(self, name: str, first: int, n: int) -> int:
        return int(self.p.read_many(self._pages(name, first, n)).sum())

    def op_madvise(self, name: str, advice: str) -> None:
        self.p.madvise(self.addrs[name], HPAGE_PMD_SIZE, ADVICE[advice])

    def op_mprotect_trick(self, name: str) -> None:
        addr = self.addrs[name] + PAGE_SIZE
        self.p.mprotect(addr, PAGE_SIZE, PROT_READ)
        self.p.mprotect(addr, PAGE_SIZE, PROT_READ | PROT_WRITE)

    def op_field(self, name: str, field: str) -> int:
        a = self.addrs[name]
        return procfs.smaps_field_in_range(procfs.parse_smaps(self.p.smaps()), a, a + HPAGE_PMD_SIZE, field)

    def pagemap(self, name: str) -> list[int]:
        return [int(x) for x in self.p.pagemap(self.addrs[name], NR)]

    def fork(self) -> "SimSide":
        return SimSide(self.p.fork(), self.addrs)

    def exit(self) -> None:
        self.p.exit()


# -- the programs ------------------------------------------------------------------------------------
def _thp(side, name: str) -> None:
    """Map a THP region and store to every page; NoThp unless it is one PMD-mapped THP."""
    side.do("map", name, "thp")
    side.do("write", name, 0, NR)
    if side.do("field", name, "AnonHugePages") != 2048:
        raise NoThp(f"region {name}: no PMD THP after populating it")


def program_referenced(side) -> dict:
    obs = {}
    _thp(side, "T")
    obs["T written"] = side.do("field", "T", "Referenced")
    side.do("madvise", "T", "cold")
    obs["T cold"] = side.do("field", "T", "Referenced")
    side.do("read", "T", 0, NR)
    obs["T cold, read 2M"] = side.do("field", "T", "Referenced")
    side.do("madvise", "T", "cold")
    side.do("read", "T", 0, 1)
    obs["T cold, read 1 page"] = side.do("field", "T", "Referenced")
    side.do("map", "S", "4k")
    side.do("write", "S", 0, NR)
    side.do("madvise", "S", "cold")
    obs["S cold"] = side.do("field", "S", "Referenced")
    side.do("read", "S", 0, 128)
    obs["S cold, read 128 pages"] = side.do("field", "S", "Referenced")
    side.do("write", "S", 0, NR)
    child = side.fork()
    try:
        for name in ("T", "S"):
            obs[f"{name} child after fork"] = child.do("field", name, "Referenced")
            obs[f"{name} parent after fork"] = side.do("field", name, "Referenced")
        child.do("read", "T", 3, 1)
        child.do("read", "S", 0, 256)
        for name in ("T", "S"):
            obs[f"{name} child after its reads"] = child.do("field", name, "Referenced")
            side.do("madvise", name, "cold")         # shared with the child: left alone
            obs[f"{name} parent cold while shared"] = side.do("field", name, "Referenced")
    finally:
        child.exit()
    for name in ("T", "S"):
        side.do("madvise", name, "cold")
        obs[f"{name} parent cold after the child's exit"] = side.do("field", name, "Referenced")
    for name, backing in (("Z", "thp"), ("ZS", "4k")):
        side.do("map", name, backing)
        side.do("read", name, 0, NR)
        obs[f"{name} read (zero page)"] = (side.do("field", name, "Rss"), side.do("field", name, "Referenced"))
    return obs


def program_exclusive(side) -> dict:
    obs = {}
    for name in ("A", "B", "C"):
        _thp(side, name)
    obs["A populated"] = side.do("excl", "A")
    side.do("madvise", "C", "nohuge")                  # keep khugepaged off C
    side.do("mprotect_trick", "C")
    obs["C PTE-mapped: AnonHugePages"] = side.do("field", "C", "AnonHugePages")
    obs["C PTE-mapped"] = side.do("excl", "C")
    child = side.fork()
    try:
        for name in ("A", "B", "C"):
            obs[f"{name} parent after fork"] = side.do("excl", name)
            obs[f"{name} child after fork"] = child.do("excl", name)
        child.do("write", "A", 1, 1)                   # partial COW of a tail page
        child.do("write", "B", 0, 1)                   # partial COW of the head page
        child.do("write", "C", 5, 1)                   # COW of one page of a PTE-mapped THP
        for name in ("A", "B", "C"):
            obs[f"{name} parent after the child's COW"] = side.do("excl", name)
            obs[f"{name} child after its COW"] = child.do("excl", name)
            obs[f"{name} parent AnonHugePages"] = side.do("field", name, "AnonHugePages")
    finally:
        child.exit()
    for name in ("A", "B", "C"):
        obs[f"{name} parent after the child's exit"] = side.do("excl", name)
    for name, backing in (("Z", "thp"), ("ZS", "4k")):
        side.do("map", name, backing)
        side.do("read", name, 0, NR)
        obs[f"{name} (present, file, exclusive) of pages 0, 1, 511"] = side.do("bits", name)
    return obs


PROGRAMS = {"referenced": program_referenced, "exclusive": program_exclusive}


def run_real(program) -> dict:
    side = RealSide()
    try:
        with scenario.lab_lock():
            return program(side)
    finally:
        side.close()


@pytest.mark.realkernel
@pytest.mark.parametrize("name", list(PROGRAMS))
def test_real_kernel_and_simulator_agree(name: str) -> None:
    skip_without_real_thp(_not_x86_64_sizes)
    try:
        real = run_real(PROGRAMS[name])
    except NoThp as e:
        pytest.skip(f"the running kernel gave no THP: {e}")
    sim = PROGRAMS[name](SimSide.boot(procfs.read_thp_knobs()))
    diff = {key: {"real": real[key], "sim": sim[key]} for key in real if real[key] != sim[key]}
    assert not diff, json.dumps(diff, indent=1, default=str)


# The figures the programs must find, written out (kernel-semantics.md §1.2, §9.1, §9.2): both
# sides are held to them, so an agreement on something else (a broken probe) still fails.
ALL = f"0-{NR - 1}"
EXPECTED = {
    "referenced": {
        "T written": 2048, "T cold": 0, "T cold, read 2M": 2048, "T cold, read 1 page": 2048,
        "S cold": 0, "S cold, read 128 pages": 512,
        "T child after fork": 0, "T parent after fork": 2048, "S child after fork": 0, "S parent after fork": 2048,
        "T child after its reads": 2048, "S child after its reads": 1024,
        "T parent cold while shared": 2048, "S parent cold while shared": 2048,
        "T parent cold after the child's exit": 0, "S parent cold after the child's exit": 0,
        "Z read (zero page)": (0, 0), "ZS read (zero page)": (0, 0),
    },
    "exclusive": {
        "A populated": ALL, "C PTE-mapped: AnonHugePages": 0, "C PTE-mapped": ALL,
        **{f"{n} {who} after fork": "" for n in "ABC" for who in ("parent", "child")},
        "A parent after the child's COW": "", "A child after its COW": "1",
        "B parent after the child's COW": ALL, "B child after its COW": "0",
        "C parent after the child's COW": "5", "C child after its COW": "5",
        "A parent AnonHugePages": 2048, "B parent AnonHugePages": 2048, "C parent AnonHugePages": 0,
        **{f"{n} parent after the child's exit": ALL for n in "ABC"},
        "Z (present, file, exclusive) of pages 0, 1, 511": "110 110 110",
        "ZS (present, file, exclusive) of pages 0, 1, 511": "100 100 100",
    },
}


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_simulator_gives_the_expected_figures(name: str) -> None:
    """The simulator side alone (runs everywhere): every figure as written in EXPECTED."""
    knobs = {"enabled": "madvise", "defrag": "madvise", "use_zero_page": "1"}
    sim = PROGRAMS[name](SimSide.boot(knobs))
    want = {key: list(v) if isinstance(v, tuple) else v for key, v in EXPECTED[name].items()}
    got = {key: list(v) if isinstance(v, tuple) else v for key, v in sim.items()}
    assert got == want
