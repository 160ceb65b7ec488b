"""The lab's one fs layer: every read of /proc and /sys that the lab makes goes through here.

Every function takes ``root`` (default ``"/"``) so that tests can point it at a fake tree
under ``tmp_path``. The layer only reads. In particular it never writes sysfs: the lab
observes the THP knobs and does not change them.

Views and their kernel sources (v6.18):
- /proc/vmstat                          mm/vmstat.c:vmstat_text[]
- /sys/kernel/mm/transparent_hugepage/  mm/huge_memory.c (sysfs knobs)
- /proc/PID/smaps, smaps_rollup         fs/proc/task_mmu.c:show_smap(), show_smaps_rollup()
- /proc/PID/pagemap                     fs/proc/task_mmu.c:pagemap_read()
- /proc/kpageflags, /proc/kpagecount    fs/proc/page.c

Pages are numpy ``uint64`` arrays with bit constants under their kernel names, never one
Python object per 4 KiB (style.md §11, after tools/mm/thpmaps).

Errors are :class:`LabError`, whose message names the file and the problem.
"""

from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

PAGE_SIZE: int = os.sysconf("SC_PAGE_SIZE")
PAGE_SHIFT: int = PAGE_SIZE.bit_length() - 1

THP_SYSFS = "sys/kernel/mm/transparent_hugepage"
# x86-64 PMD size, used only when hpage_pmd_size cannot be read.
DEFAULT_HPAGE_PMD_SIZE = 2 << 20


class LabError(Exception):
    """A kernel file could not be read or parsed. The message names the file and the problem."""


# ---------------------------------------------------------------------------------------------
# Low-level helpers
# ---------------------------------------------------------------------------------------------

def _path(root: str, *parts: str) -> str:
    """Join ``parts`` (relative, e.g. "proc", "vmstat") under ``root``."""
    return os.path.join(root, *parts)


def _read_text(path: str) -> str:
    """Return the contents of a text file under /proc or /sys, or raise LabError naming it."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        raise LabError(f"{path}: no such file") from None
    except PermissionError:
        raise LabError(f"{path}: permission denied (the lab runs as root for this view)") from None
    except OSError as e:
        raise LabError(f"{path}: cannot read: {e.strerror or e}") from None


def _pread_exact(fd: int, nbytes: int, offset: int, path: str) -> bytearray:
    """Read exactly ``nbytes`` at ``offset`` with os.preadv, or raise LabError naming ``path``.

    The binary proc files return fewer bytes than asked at their end (kpageflags past
    max_pfn) and may return a short count in the middle, so this loops until full.
    """
    buf = bytearray(nbytes)
    view = memoryview(buf)
    done = 0
    while done < nbytes:
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as e:
            raise LabError(f"{path}: cannot read {nbytes} bytes at offset {offset:#x}: "
                           f"{e.strerror or e}") from None
        if n == 0:
            raise LabError(f"{path}: short read: got {done} of {nbytes} bytes at offset "
                           f"{offset:#x} (past the end of the file?)")
        done += n
    return buf


def _open_binary(path: str) -> int:
    """os.open ``path`` read-only, or raise LabError naming it."""
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise LabError(f"{path}: no such file") from None
    except PermissionError:
        raise LabError(f"{path}: permission denied (needs root)") from None
    except OSError as e:
        raise LabError(f"{path}: cannot open: {e.strerror or e}") from None


def cont_ranges(sorted_values: np.ndarray) -> list[tuple[int, int]]:
    """Split a sorted array of distinct integers into runs of consecutive values.

    Returns index ranges ``[(i, j), ...]`` such that ``sorted_values[i:j]`` is consecutive.
    Vectorised as in thpmaps' cont_ranges_all (``np.diff == 1``).
    """
    n = len(sorted_values)
    if n == 0:
        return []
    breaks = np.flatnonzero(np.diff(sorted_values.astype(np.int64)) != 1) + 1
    starts = [0, *breaks.tolist()]
    ends = [*breaks.tolist(), n]
    return list(zip(starts, ends))


# ---------------------------------------------------------------------------------------------
# /proc/vmstat
# ---------------------------------------------------------------------------------------------

def parse_vmstat(text: str, source: str = "/proc/vmstat") -> dict[str, int]:
    """Parse /proc/vmstat text ("name value" per line) into a dict; ``source`` names errors."""
    out: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise LabError(f"{source}:{lineno}: expected 'name value', got {line!r}")
        try:
            out[parts[0]] = int(parts[1])
        except ValueError:
            raise LabError(f"{source}:{lineno}: value of {parts[0]} is not an integer: "
                           f"{parts[1]!r}") from None
    return out


def read_vmstat(root: str = "/") -> dict[str, int]:
    """Return every counter of /proc/vmstat (system-wide) as a dict name -> int."""
    path = _path(root, "proc", "vmstat")
    return parse_vmstat(_read_text(path), source=path)


# ---------------------------------------------------------------------------------------------
# THP knobs (/sys/kernel/mm/transparent_hugepage), read only
# ---------------------------------------------------------------------------------------------

_BRACKETED = re.compile(r"\[([^\]]+)\]")
_HUGEPAGES_DIR = re.compile(r"^hugepages-(\d+)kB$")


def knob_value(text: str) -> str:
    """Return the selected value of a knob file: the bracketed word if any, else the text.

    "always [madvise] never\\n" -> "madvise"; "511\\n" -> "511".
    """
    m = _BRACKETED.search(text)
    return m.group(1) if m else text.strip()


def hpage_pmd_size(root: str = "/") -> int:
    """Return hpage_pmd_size in bytes (2 MiB on x86-64); the x86-64 value if the file is absent."""
    path = _path(root, THP_SYSFS, "hpage_pmd_size")
    if not os.path.exists(path):
        return DEFAULT_HPAGE_PMD_SIZE
    text = _read_text(path).strip()
    try:
        return int(text)
    except ValueError:
        raise LabError(f"{path}: not an integer: {text!r}") from None


def read_thp_knobs(root: str = "/") -> dict[str, str]:
    """Return the selected value of each THP knob, keyed by its path below transparent_hugepage/.

    Keys: enabled, defrag, use_zero_page, shrink_underused, hpage_pmd_size, every
    khugepaged/<file>, and every hugepages-<N>kB/enabled (ascending N). Values are the
    bracketed word for choice knobs ("madvise", "inherit") and the text for numeric ones.
    Knobs are detected by file existence: a knob the running kernel lacks is absent from
    the dict (shrink_underused: v6.12; hugepages-<N>kB/: v6.8). Without the THP directory
    (no CONFIG_TRANSPARENT_HUGEPAGE) the dict is empty; thp_available() gives the reason.
    """
    base = _path(root, THP_SYSFS)
    if not os.path.isdir(base):
        return {}
    out: dict[str, str] = {}
    for name in ("enabled", "defrag", "use_zero_page", "shrink_underused", "hpage_pmd_size"):
        path = os.path.join(base, name)
        if os.path.isfile(path):
            out[name] = knob_value(_read_text(path))
    khd = os.path.join(base, "khugepaged")
    if os.path.isdir(khd):
        for name in sorted(os.listdir(khd)):
            path = os.path.join(khd, name)
            if os.path.isfile(path):
                out[f"khugepaged/{name}"] = knob_value(_read_text(path))
    sizes: list[tuple[int, str]] = []
    for name in os.listdir(base):
        m = _HUGEPAGES_DIR.match(name)
        if m and os.path.isfile(os.path.join(base, name, "enabled")):
            sizes.append((int(m.group(1)), name))
    for _, name in sorted(sizes):
        out[f"{name}/enabled"] = knob_value(_read_text(os.path.join(base, name, "enabled")))
    return out


def thp_available(root: str = "/") -> tuple[bool, str]:
    """Can an MADV_HUGEPAGE region get a PMD THP at fault time? Return (ok, reason).

    Mirrors the sysfs part of __thp_vma_allowable_orders() for a VM_HUGEPAGE VMA
    (kernel-semantics.md §2.2): PMD order is allowed iff
      hugepages-<PMD>kB/enabled is always or madvise, or
      it is inherit and the global enabled is always or madvise.
    Kernels before v6.8 have no hugepages-<N>kB/ directories; the PMD size then follows
    the global knob, i.e. behaves as inherit. The reason string is "" when ok.
    Per-process prctl(PR_SET_THP_DISABLE) and allocation failures are not judged here.
    """
    base = _path(root, THP_SYSFS)
    enabled_path = os.path.join(base, "enabled")
    if not os.path.isfile(enabled_path):
        return False, (f"{enabled_path} does not exist: kernel built without "
                       "CONFIG_TRANSPARENT_HUGEPAGE, or sysfs not mounted")
    g = knob_value(_read_text(enabled_path))
    pmd_dir = f"hugepages-{hpage_pmd_size(root) // 1024}kB"
    per_size_path = os.path.join(base, pmd_dir, "enabled")
    s = knob_value(_read_text(per_size_path)) if os.path.isfile(per_size_path) else "inherit"
    if s in ("always", "madvise"):
        return True, ""
    if s == "inherit" and g in ("always", "madvise"):
        return True, ""
    if s == "never":
        return False, (f"{per_size_path} is [never]: no PMD THP even for MADV_HUGEPAGE "
                       f"regions (global enabled is [{g}])")
    if s == "inherit":
        return False, (f"{enabled_path} is [{g}] and {pmd_dir}/enabled is [inherit]: "
                       "no PMD THP even for MADV_HUGEPAGE regions")
    return False, f"{per_size_path}: unknown value [{s}]"


# ---------------------------------------------------------------------------------------------
# /proc/PID/smaps and smaps_rollup
# ---------------------------------------------------------------------------------------------

@dataclass
class Vma:
    """One VMA of /proc/PID/smaps.

    ``fields`` holds the "<Name>: <n> kB" lines in kB (Rss, AnonHugePages, ...);
    ``thp_eligible`` is the THPeligible line (None on kernels before v5.0, which lack it);
    ``vm_flags`` the VmFlags mnemonics ("hg" = VM_HUGEPAGE); ``extra`` any other line
    that is not in kB (e.g. "ProtectionKey"), as text.
    """

    start: int
    end: int
    perms: str
    offset: int
    dev: str
    inode: int
    name: str
    fields: dict[str, int] = field(default_factory=dict)
    thp_eligible: int | None = None
    vm_flags: list[str] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Size of the VMA in bytes."""
        return self.end - self.start

    def kb(self, name: str) -> int:
        """Value of the kB field ``name`` (0 if the kernel does not print it)."""
        return self.fields.get(name, 0)


_SMAPS_HEADER = re.compile(
    r"^([0-9a-f]+)-([0-9a-f]+)\s+([-rwxsp]{4})\s+([0-9a-f]+)\s+([0-9a-f]+:[0-9a-f]+)"
    r"\s+(\d+)(?:\s+(.*))?$")
_SMAPS_KB = re.compile(r"^(\w+):\s+(\d+) kB$")
_SMAPS_OTHER = re.compile(r"^(\w+):\s*(.*)$")


def parse_smaps(text: str, source: str = "smaps") -> list[Vma]:
    """Parse /proc/PID/smaps text into a list of :class:`Vma`, in address order.

    ``source`` names the file in errors ("smaps:12: ...").
    """
    vmas: list[Vma] = []
    cur: Vma | None = None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        h = _SMAPS_HEADER.match(line)
        if h:
            cur = Vma(start=int(h.group(1), 16), end=int(h.group(2), 16), perms=h.group(3),
                      offset=int(h.group(4), 16), dev=h.group(5), inode=int(h.group(6)),
                      name=(h.group(7) or "").strip())
            vmas.append(cur)
            continue
        if cur is None:
            raise LabError(f"{source}:{lineno}: field line before the first VMA header: "
                           f"{line!r}")
        if line.startswith("VmFlags:"):
            cur.vm_flags = line[len("VmFlags:"):].split()
            continue
        m = _SMAPS_KB.match(line)
        if m:
            cur.fields[m.group(1)] = int(m.group(2))
            continue
        m = _SMAPS_OTHER.match(line)
        if m is None:
            raise LabError(f"{source}:{lineno}: cannot parse {line!r}")
        key, value = m.group(1), m.group(2).strip()
        if key == "THPeligible":
            try:
                cur.thp_eligible = int(value)
            except ValueError:
                raise LabError(f"{source}:{lineno}: THPeligible is not an integer: "
                               f"{value!r}") from None
        else:
            cur.extra[key] = value
    return vmas


def read_smaps(pid: int | str, root: str = "/") -> list[Vma]:
    """Read and parse /proc/<pid>/smaps (``pid`` may be "self")."""
    path = _path(root, "proc", str(pid), "smaps")
    return parse_smaps(_read_text(path), source=path)


def parse_smaps_rollup(text: str, source: str = "smaps_rollup") -> dict[str, int]:
    """Parse /proc/PID/smaps_rollup text into {field: kB}; the "[rollup]" header is skipped."""
    out: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or _SMAPS_HEADER.match(line):
            continue
        m = _SMAPS_KB.match(line)
        if m is None:
            raise LabError(f"{source}:{lineno}: expected '<Name>: <n> kB', got {line!r}")
        out[m.group(1)] = int(m.group(2))
    return out


def read_smaps_rollup(pid: int | str, root: str = "/") -> dict[str, int]:
    """Read and parse /proc/<pid>/smaps_rollup (``pid`` may be "self")."""
    path = _path(root, "proc", str(pid), "smaps_rollup")
    return parse_smaps_rollup(_read_text(path), source=path)


def vmas_in_range(vmas: Iterable[Vma], start: int, end: int) -> list[Vma]:
    """The VMAs that intersect the address range [start, end)."""
    return [v for v in vmas if v.start < end and v.end > start]


def smaps_field_in_range(vmas: Iterable[Vma], start: int, end: int, name: str) -> int:
    """Sum the kB field ``name`` over the VMAs intersecting [start, end).

    Whole VMAs are summed: exact when [start, end) is a VMA of its own (e.g. after
    madvise() split it off), an over-count if a VMA also covers memory outside the range.
    """
    return sum(v.kb(name) for v in vmas_in_range(vmas, start, end))


# ---------------------------------------------------------------------------------------------
# /proc/PID/pagemap: one u64 per virtual page (fs/proc/task_mmu.c, v6.18)
# ---------------------------------------------------------------------------------------------

# Masks, as the kernel defines them (GENMASK_ULL / BIT_ULL), so `entries & PM_PRESENT`.
PM_ENTRY_BYTES = 8
PM_PFRAME_BITS = 55
PM_PFRAME_MASK = (1 << PM_PFRAME_BITS) - 1     # bits 0-54: PFN (0 without CAP_SYS_ADMIN)
PM_SOFT_DIRTY = 1 << 55
PM_MMAP_EXCLUSIVE = 1 << 56                    # v4.2; CONFIG_PAGE_MAPCOUNT: page mapped once
PM_UFFD_WP = 1 << 57                           # v5.14
PM_GUARD_REGION = 1 << 58                      # v6.14
PM_FILE = 1 << 61
PM_SWAP = 1 << 62
PM_PRESENT = 1 << 63


def read_pagemap(pid: int | str, start_addr: int, npages: int, root: str = "/") -> np.ndarray:
    """Return the pagemap entries of ``npages`` pages from ``start_addr`` as uint64.

    ``start_addr`` must be page aligned. PFNs read as 0 unless the reader has
    CAP_SYS_ADMIN. Decode with the PM_* masks or pagemap_pfn().
    """
    path = _path(root, "proc", str(pid), "pagemap")
    if start_addr % PAGE_SIZE:
        raise ValueError(f"{path}: start address {start_addr:#x} is not page aligned")
    if npages < 0:
        raise ValueError(f"{path}: negative page count {npages}")
    if npages == 0:
        return np.zeros(0, dtype=np.uint64)
    fd = _open_binary(path)
    try:
        buf = _pread_exact(fd, npages * PM_ENTRY_BYTES,
                           (start_addr >> PAGE_SHIFT) * PM_ENTRY_BYTES, path)
    finally:
        os.close(fd)
    return np.frombuffer(buf, dtype=np.uint64)


# PAGEMAP_SCAN (v6.7, fs/proc/task_mmu.c): an ioctl on the pagemap file that returns ranges of
# pages with the categories asked for.  PAGE_IS_HUGE is the one thing pagemap cannot say: the page
# is mapped by a PMD (a PMD-mapped THP, or hugetlb).
PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6
PAGE_IS_SOFT_DIRTY = 1 << 7
_PM_SCAN_ARG_SIZE = 96                        # struct pm_scan_arg: 12 u64
PAGEMAP_SCAN = (3 << 30) | (_PM_SCAN_ARG_SIZE << 16) | (ord("f") << 8) | 16     # _IOWR('f', 16, ...)


class PageRegion(ctypes.Structure):
    """struct page_region: one run of pages PAGEMAP_SCAN reports, and their categories."""
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


class PmScanArg(ctypes.Structure):
    """struct pm_scan_arg: the PAGEMAP_SCAN ioctl's argument (include/uapi/linux/fs.h)."""
    _fields_ = [(n, ctypes.c_uint64) for n in ("size", "flags", "start", "end", "walk_end", "vec", "vec_len",
                                               "max_pages", "category_inverted", "category_mask",
                                               "category_anyof_mask", "return_mask")]


def pagemap_scan(pid: int | str, start: int, end: int, categories: int, root: str = "/",
                 max_regions: int = 4096) -> list[tuple[int, int, int]] | None:
    """PAGEMAP_SCAN over [start, end): (start, end, categories) ranges of the pages that have any of
    ``categories``, each range reporting which of them it has.  None where the kernel lacks the
    ioctl (before v6.7)."""
    import errno as _errno
    import fcntl

    path = _path(root, "proc", str(pid), "pagemap")

    vec = (PageRegion * max_regions)()
    out: list[tuple[int, int, int]] = []
    fd = _open_binary(path)
    try:
        pos = start
        while pos < end:
            arg = PmScanArg(size=ctypes.sizeof(PmScanArg), start=pos, end=end,
                            vec=ctypes.addressof(vec), vec_len=max_regions,
                            category_anyof_mask=categories, return_mask=categories)
            try:
                n = fcntl.ioctl(fd, PAGEMAP_SCAN, arg)
            except OSError as exc:
                if exc.errno in (_errno.ENOTTY, _errno.EINVAL) and not out and pos == start:
                    return None
                raise LabError(f"{path}: PAGEMAP_SCAN at {pos:#x}: {exc.strerror}") from None
            out += [(int(vec[i].start), int(vec[i].end), int(vec[i].categories)) for i in range(n)]
            if arg.walk_end <= pos:
                break
            pos = int(arg.walk_end)
    finally:
        os.close(fd)
    return out


def pagemap_pfn(entries: np.ndarray) -> np.ndarray:
    """PFN of each present entry, 0 for non-present (and for swap entries)."""
    entries = np.asarray(entries, dtype=np.uint64)
    present = (entries & np.uint64(PM_PRESENT)) != 0
    return np.where(present, entries & np.uint64(PM_PFRAME_MASK), np.uint64(0))


def pagemap_flag(entries: np.ndarray, mask: int) -> np.ndarray:
    """Boolean array: is ``mask`` (a PM_* constant) set in each entry."""
    return (np.asarray(entries, dtype=np.uint64) & np.uint64(mask)) != 0


# ---------------------------------------------------------------------------------------------
# /proc/kpageflags and /proc/kpagecount: one u64 per PFN (fs/proc/page.c)
# ---------------------------------------------------------------------------------------------

# Bit numbers, as include/uapi/linux/kernel-page-flags.h defines them (so `flags >> KPF_THP & 1`,
# or kpf_test(flags, KPF_THP)). NB: unlike PM_*, which the kernel defines as masks.
KPF_LOCKED = 0
KPF_ERROR = 1
KPF_REFERENCED = 2
KPF_UPTODATE = 3
KPF_DIRTY = 4
KPF_LRU = 5
KPF_ACTIVE = 6
KPF_SLAB = 7
KPF_WRITEBACK = 8
KPF_RECLAIM = 9
KPF_BUDDY = 10
KPF_MMAP = 11
KPF_ANON = 12
KPF_SWAPCACHE = 13
KPF_SWAPBACKED = 14
KPF_COMPOUND_HEAD = 15
KPF_COMPOUND_TAIL = 16
KPF_HUGE = 17              # hugetlb only
KPF_UNEVICTABLE = 18
KPF_HWPOISON = 19
KPF_NOPAGE = 20
KPF_KSM = 21
KPF_THP = 22               # every page of any large rmappable folio (mTHP too)
KPF_OFFLINE = 23
KPF_ZERO_PAGE = 24
KPF_IDLE = 25
KPF_PGTABLE = 26

KPF_NAMES: dict[int, str] = {
    v: k[len("KPF_"):] for k, v in dict(globals()).items()
    if k.startswith("KPF_") and isinstance(v, int) and k != "KPF_NAMES"
}


def kpf_test(flags: np.ndarray, bit: int) -> np.ndarray:
    """Boolean array: is KPF bit number ``bit`` set in each kpageflags word."""
    return ((np.asarray(flags, dtype=np.uint64) >> np.uint64(bit)) & np.uint64(1)) != 0


def kpf_names(word: int) -> list[str]:
    """Names of the KPF bits set in one kpageflags word (for messages)."""
    return [name for bit, name in sorted(KPF_NAMES.items()) if (int(word) >> bit) & 1]


def _read_pfn_table(path: str, pfns: np.ndarray | Iterable[int]) -> np.ndarray:
    """Read the u64 of each PFN from a per-PFN table, in the order of ``pfns``.

    Distinct PFNs are sorted and read one preadv per run of consecutive PFNs.
    """
    arr = np.asarray(pfns, dtype=np.uint64)
    flat = arr.ravel()
    if flat.size == 0:
        return np.zeros(arr.shape, dtype=np.uint64)
    uniq = np.unique(flat)
    values = np.empty(uniq.size, dtype=np.uint64)
    fd = _open_binary(path)
    try:
        for i, j in cont_ranges(uniq):
            buf = _pread_exact(fd, (j - i) * 8, int(uniq[i]) * 8, path)
            values[i:j] = np.frombuffer(buf, dtype=np.uint64)
    finally:
        os.close(fd)
    return values[np.searchsorted(uniq, flat)].reshape(arr.shape)


def read_kpageflags(pfns: np.ndarray | Iterable[int], root: str = "/") -> np.ndarray:
    """Return the /proc/kpageflags word of each PFN (uint64, same order). Needs root."""
    return _read_pfn_table(_path(root, "proc", "kpageflags"), pfns)


def read_kpagecount(pfns: np.ndarray | Iterable[int], root: str = "/") -> np.ndarray:
    """Return the /proc/kpagecount value (precise page mapcount) of each PFN. Needs root."""
    return _read_pfn_table(_path(root, "proc", "kpagecount"), pfns)


# ---------------------------------------------------------------------------------------------
# Metadata attached to every lab result (style.md §13)
# ---------------------------------------------------------------------------------------------

def read_metadata(root: str = "/") -> dict[str, str]:
    """Return kernel release, command line, CPU model, CPU count and cpufreq governor.

    Missing files give "n/a" (a VM often has no cpufreq), so this never fails.
    """
    def first_line(*parts: str) -> str:
        try:
            return _read_text(_path(root, *parts)).strip().splitlines()[0]
        except (LabError, IndexError):
            return "n/a"

    cpu_model = "n/a"
    try:
        for line in _read_text(_path(root, "proc", "cpuinfo")).splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except LabError:
        pass
    return {
        "kernel": first_line("proc", "sys", "kernel", "osrelease"),
        "cmdline": first_line("proc", "cmdline"),
        "cpu_model": cpu_model,
        "nr_cpus": str(os.cpu_count() or 0),
        "governor": first_line("sys", "devices", "system", "cpu", "cpu0", "cpufreq",
                               "scaling_governor"),
    }
