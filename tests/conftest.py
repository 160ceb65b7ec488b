"""Fixtures and helpers shared by the test modules.

The test modules are rootless (no ``__init__.py``), so pytest puts this folder on
``sys.path`` and a module takes a helper with ``from conftest import ...``.
Fixtures need no import.

- ``k`` / ``p``: a checked simulated kernel (``check=True``: the invariant checker
  runs after every system call and access) big enough to keep THP on, and a process
  in it;
- regions: ``thp_region()`` (MADV_HUGEPAGE, every page stored: PMD THPs),
  ``small_region()`` (MADV_NOHUGEPAGE: 4 KiB pages), ``aligned_region()`` (the lab's
  ``scenario.thp_region()`` layout, untouched), with ``page_addrs()`` and
  ``page_tokens()`` for page-by-page stores;
- counters and views: ``vmstat_delta()`` (a ``VmstatDelta``), ``smaps_anon_huge_kb()``;
- the running kernel: ``skip_without_real_thp()`` and ``sim_kernel_with_knobs()``
  for the tests that run on it or compare the simulator with it.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

import numpy as np
import pytest

# NumPy madvise()s every array of 4 MiB or more with MADV_HUGEPAGE: each test process that
# builds a simulator would then fault real THPs, which the real-kernel tests (running beside it
# in another worker) see in the system-wide /proc/vmstat.  The simulator's arrays need no THPs.
try:
    from numpy._core.multiarray import _set_madvise_hugepage
except ImportError:                                     # NumPy < 2
    from numpy.core.multiarray import _set_madvise_hugepage
_set_madvise_hugepage(False)
os.environ["NUMPY_MADVISE_HUGEPAGE"] = "0"              # the same for the processes tests start
# No test may depend on a profile `thpcow calibrate` cached on this machine (cost_presets.cache_dir()):
# the tests about the cache point it at a tmp dir.
os.environ["THPCOW_PROFILE_CACHE"] = "off"

from thpcow.kernel import (  # noqa: E402
    HPAGE_PMD_SIZE, MADV_HUGEPAGE, MADV_NOHUGEPAGE, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE, MAP_PRIVATE,
    PAGE_SIZE, PROT_READ, PROT_WRITE, Kernel, Process,
)
from thpcow.kernel.sysfs import WRITABLE_PATHS
from thpcow.kernel.vmstat import delta
from thpcow.lab import procfs

MiB = 1 << 20
NR = HPAGE_PMD_SIZE // PAGE_SIZE            # 512 pages per PMD
THP_RAM = 512 << 20                         # the smallest machine that keeps THP on (hugepage_init())
ANON = MAP_PRIVATE | MAP_ANONYMOUS
RW = PROT_READ | PROT_WRITE


# -- a checked kernel and a process ----------------------------------------------------------------
@pytest.fixture
def k() -> Kernel:
    """A 512 MiB simulated kernel (THP enabled=madvise, as booted) with the invariant checker on."""
    return Kernel(ram=THP_RAM, check=True)


@pytest.fixture
def p(k: Kernel) -> Process:
    """A process of the ``k`` fixture's kernel."""
    return k.spawn()


# -- regions -----------------------------------------------------------------------------------------
def page_addrs(a: int, n: int, first: int = 0) -> np.ndarray:
    """The addresses of pages ``first`` .. ``first + n - 1`` of the region at ``a``."""
    return a + (first + np.arange(n, dtype=np.int64)) * PAGE_SIZE


def page_tokens(n: int, base: int) -> np.ndarray:
    """Distinct non-zero contents for ``n`` pages: base, base + 1, ..."""
    return base + np.arange(n, dtype=np.int64)


def _store(p: Process, a: int, npages: int, token: int | np.ndarray) -> None:
    if np.ndim(token):
        assert len(token) == npages, f"{len(token)} tokens for {npages} pages"
        p.write_many(page_addrs(a, npages), token)
    else:
        p.write(a, npages * PAGE_SIZE, token=int(token))


def thp_region(p: Process, size: int, token: int | np.ndarray = 1, populate: bool = True) -> int:
    """mmap ``size`` (a 2 MiB multiple, so 2 MiB aligned) and MADV_HUGEPAGE it; returns the address.

    With ``populate`` every page is stored to (``token`` in each, or token[i] in page i when it
    is an array, one store per page) and the whole region must then be PMD-mapped THPs.
    """
    a = p.mmap(size)
    assert a % HPAGE_PMD_SIZE == 0
    p.madvise(a, size, MADV_HUGEPAGE)
    if populate:
        before = p.smaps_fields()["AnonHugePages"]
        _store(p, a, size // PAGE_SIZE, token)
        assert p.smaps_fields()["AnonHugePages"] - before == size >> 10, "the region did not get THPs"
    return a


def small_region(p: Process, npages: int, token: int | np.ndarray = 1, addr: int = 0) -> int:
    """A populated MADV_NOHUGEPAGE region of ``npages`` 4 KiB pages (no THP whatever the knobs).

    ``token`` as for thp_region(); ``addr`` places it with MAP_FIXED_NOREPLACE.
    """
    flags = ANON | (MAP_FIXED_NOREPLACE if addr else 0)
    a = p.mmap(npages * PAGE_SIZE, flags=flags, addr=addr)
    p.madvise(a, npages * PAGE_SIZE, MADV_NOHUGEPAGE)
    _store(p, a, npages, token)
    return a


def aligned_region(p: Process, size: int, advice: int = MADV_HUGEPAGE) -> int:
    """The lab's scenario.thp_region() on the simulator: mmap ``size`` + 2 MiB, madvise(advice)
    the 2 MiB aligned ``size`` bytes inside it, touch nothing; returns their start."""
    base = p.mmap(size + HPAGE_PMD_SIZE)
    start = (base + HPAGE_PMD_SIZE - 1) & ~(HPAGE_PMD_SIZE - 1)
    p.madvise(start, size, advice)
    return start


# -- counters and views ------------------------------------------------------------------------------
class VmstatDelta(dict):
    """The vmstat counters that moved, with their deltas; ``d[name]`` is 0 for a counter that
    did not move and a KeyError for a name that is no counter (a typo must not read as 0)."""

    def __init__(self, after: dict[str, int], before: dict[str, int]) -> None:
        super().__init__(delta(after, before))
        self.names = frozenset(after)

    def __missing__(self, name: str) -> int:
        if name in self.names:
            return 0
        raise KeyError(f"{name!r} is not a vmstat counter")


def vmstat_delta(k: Kernel, before: dict[str, int]) -> VmstatDelta:
    """The vmstat counters that moved since ``before`` (a k.vmstat_snapshot())."""
    return VmstatDelta(k.vmstat_snapshot(), before)


def smaps_anon_huge_kb(p: Process, start: int, end: int) -> int:
    """AnonHugePages of the VMAs covering [start, end): the lab's parser on the simulator's smaps."""
    return procfs.smaps_field_in_range(procfs.parse_smaps(p.smaps()), start, end, "AnonHugePages")


# -- the running kernel ------------------------------------------------------------------------------
def real_thp_skip_reason() -> str | None:
    """Why no MADV_HUGEPAGE region of this process can get a THP on the running kernel, or None."""
    if not sys.platform.startswith("linux"):
        return f"not Linux ({sys.platform})"
    ok, reason = procfs.thp_available()
    return None if ok else reason


def skip_without_real_thp(*more_checks: Callable[[], str | None]) -> None:
    """pytest.skip() with the reason when real_thp_skip_reason() or one of ``more_checks``
    (each returns why the test cannot run here, or None) gives one."""
    for check in (real_thp_skip_reason, *more_checks):
        reason = check()
        if reason:
            pytest.skip(reason)


def skip_unless_settled(settled: bool, scores, what: str) -> None:
    """Skip, saying so, when other processes kept making THP events through every run of a
    real-kernel scenario (its system-wide counters cannot then be compared exactly)."""
    if not settled:
        pytest.skip(f"{what}: other processes made THP events during every run (system-wide "
                    f"/proc/vmstat noise scores {list(scores)}); rerun on a quieter machine")


def sim_kernel_with_knobs(knobs: dict[str, str], ram: int) -> tuple[Kernel, dict[str, str]]:
    """A checked simulated kernel with the running kernel's writable THP knobs (``knobs``, as
    procfs.read_thp_knobs() reads them); returns it and the knobs it took."""
    k = Kernel(ram=ram, check=True)
    copied = {}
    for path, value in knobs.items():
        if path in WRITABLE_PATHS:
            k.sysfs.write(path, value)
            copied[path] = value
    return k, copied


@pytest.fixture
def real_kernel():
    """The running kernel with THP, held for this test alone (the lab lock); skips without THP."""
    skip_without_real_thp()
    from thpcow.lab.scenario import lab_lock

    with lab_lock():
        yield
