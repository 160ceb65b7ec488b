"""Model of the /sys/kernel/mm/transparent_hugepage/ tree (mm/huge_memory.c, mm/khugepaged.c sysfs code, v6.18)

Every file of the tree is one row of :data:`KNOBS`: the path relative to
``/sys/kernel/mm/transparent_hugepage/``, the default, the parser that the
kernel's ``_store()`` uses, a range validator, the allowed values in words, and
one line of documentation.  Reads return the kernel's exact text, newline
included.  A bad write raises :class:`~thpcow.kernel.errors.KernelError` with
the errno the real write(2) returns, and changes nothing.

How a write reaches a store (fs/kernfs/file.c, fs/sysfs/file.c, lib/kobject.c):

- kernfs copies at most PAGE_SIZE bytes of the write and adds a NUL after them.
  The store therefore sees the text only up to the first NUL byte.
- A write of zero bytes returns 0 before any store runs: nothing changes, and
  there is no error, even on a read-only file.
- Word knobs (``enabled``, ``defrag``, ``hugepages-*/enabled``, ``thp_cow``)
  compare with sysfs_streq(): the word exactly, or the word plus one trailing
  newline.  There is no trimming and no case folding.
- Numeric knobs parse in base 10 with kstrtoul()/kstrtouint().  They accept one
  leading ``+`` and one trailing newline.  ``0x10``, ``-1``, leading or trailing
  blanks, and an empty string are EINVAL.  A number too big for the C type is
  ERANGE.  Only ``use_zero_page`` and ``khugepaged/defrag`` let ERANGE reach the
  caller; the khugepaged stores turn every parse error into EINVAL.
- ``shrink_underused`` uses kstrtobool(), which looks only at the first one or
  two characters (see :func:`kstrtobool`).
- Read-only attributes (``hpage_pmd_size``, ``stats/*``,
  ``khugepaged/pages_collapsed``, ``khugepaged/full_scans``) are 0444.  For
  root, CAP_DAC_OVERRIDE lets open(O_WRONLY) succeed.  The write then reaches
  kobj_attr_store(), which returns EIO because the attribute has no store.  The
  simulator models root, so it raises EIO.  A non-root writer would get EACCES
  from open() instead.

Simplification: shmem knobs (``shmem_enabled``, ``hugepages-*/shmem_enabled``,
``stats/shmem_*``), ``hugepages-8kB`` (shmem-only on x86) and the vendor files
on the lab machine (``anon_beside_full``, ``stats/anon_fault_declined``) are
not modelled.  Neither is the boot-time rule that turns THP off on machines with
less than 512 MiB of RAM.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from .constants import (
    ANON_ORDERS,
    HPAGE_PMD_NR,
    HPAGE_PMD_ORDER,
    HPAGE_PMD_SIZE,
    PAGE_SIZE,
    order_to_kb,
)
from .errors import KernelError, einval
from .vmstat import MTHP_STAT_ITEMS

SYSFS_ROOT = "/sys/kernel/mm/transparent_hugepage"

StatsReader = Callable[[int, str], int]
CounterReader = Callable[[str], int]
Listener = Callable[[str, str, str], None]
Value = str | int
Parser = Callable[[str, str], Value]

ULONG_MAX = (1 << 64) - 1
UINT_MAX = (1 << 32) - 1
KHUGEPAGED_MAX_PTES_LIMIT = HPAGE_PMD_NR - 1

GLOBAL_ENABLED_MODES = ("always", "madvise", "never")
DEFRAG_MODES = ("always", "defer", "defer+madvise", "madvise", "never")
ANON_ENABLED_MODES = ("always", "inherit", "madvise", "never")
THP_COW_MODES = ("always", "madvise", "never")       # series thp_cow v1 2/5
KHUGEPAGED_COUNTERS = ("pages_collapsed", "full_scans")


# --------------------------------------------------------------------------
# String parsers.  Each one takes (call, text) and returns the parsed value, or
# raises KernelError with the errno the kernel function returns.
# --------------------------------------------------------------------------

def sysfs_streq(word: str, text: str) -> bool:
    """Model of lib/string.c:sysfs_streq(): equal, or equal but for one trailing newline."""
    return text == word or text == word + "\n"


def sysfs_match_string(words: tuple[str, ...]) -> Parser:
    """Model of lib/string.c:__sysfs_match_string() over a fixed table of words."""
    def parse(call: str, text: str) -> str:
        for word in words:
            if sysfs_streq(word, text):
                return word
        raise einval(call, f"{text!r} is not one of: {' '.join(words)}")
    return parse


def _ascii_digits(text: str) -> int:
    """Length of the run of ASCII decimal digits that starts *text*."""
    n = 0
    while n < len(text) and "0" <= text[n] <= "9":
        n += 1
    return n


def _kstrtoull(call: str, text: str, limit: int, name: str) -> int:
    """Model of lib/kstrtox.c:kstrtoull(s, 10, ...) plus the width check of its callers.

    Overflow is reported before the trailing-garbage check, as in
    _kstrtoull(): "99999999999999999999x" is ERANGE, not EINVAL.
    """
    body = text[1:] if text.startswith("+") else text
    n = _ascii_digits(body)
    digits = body[:n].lstrip("0")
    if len(digits) > 20 or (digits and int(digits) > ULONG_MAX):
        raise KernelError(errno.ERANGE, call, f"{text!r} overflows unsigned long ({name})")
    if n == 0:
        raise einval(call, f"{text!r} is not a base-10 unsigned integer ({name})")
    if body[n:] not in ("", "\n"):
        raise einval(call, f"{text!r} has trailing characters after the number ({name})")
    value = int(digits or "0")
    if value > limit:
        raise KernelError(errno.ERANGE, call, f"{text!r} is larger than {limit} ({name})")
    return value


def kstrtoul(call: str, text: str) -> int:
    """Model of lib/kstrtox.c:kstrtoul(s, 10, ...) on a 64-bit kernel."""
    return _kstrtoull(call, text, ULONG_MAX, "kstrtoul")


def kstrtouint(call: str, text: str) -> int:
    """Model of lib/kstrtox.c:kstrtouint(s, 10, ...)."""
    return _kstrtoull(call, text, UINT_MAX, "kstrtouint")


_BOOL_TRUE_FIRST = "EeYyTt1"
_BOOL_FALSE_FIRST = "DdNnFf0"


def kstrtobool(call: str, text: str) -> int:
    """Model of lib/kstrtox.c:kstrtobool() (v6.18, with the e/d letters).

    Only the first character counts, or the first two after 'o'/'O'.  So
    "yesterday" is true, "0xff" is false and "of" is false.
    """
    first, second = text[:1], text[1:2]
    if first and first in _BOOL_TRUE_FIRST:
        return 1
    if first and first in _BOOL_FALSE_FIRST:
        return 0
    if first in ("o", "O") and second and second in "Nn":
        return 1
    if first in ("o", "O") and second and second in "Ff":
        return 0
    raise einval(call, f"{text!r} is not a boolean (kstrtobool: first letter of "
                       "1/0, y/n, t/f, e/d, or on/off)")


def any_error_is_einval(parser: Parser) -> Parser:
    """The khugepaged stores' `if (err) return -EINVAL`: ERANGE becomes EINVAL."""
    def parse(call: str, text: str) -> Value:
        try:
            return parser(call, text)
        except KernelError as err:
            if err.errno == errno.EINVAL:
                raise
            raise einval(call, err.detail) from None
    return parse


# --------------------------------------------------------------------------
# The knob table
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Knob:
    """One file of the tree: a kobj_attribute with its _show()/_store() pair."""

    path: str                                   # relative to SYSFS_ROOT
    default: Value | None                       # None: read-only, the value comes from `source`
    parse: Parser | None                        # None: no _store() (read-only, 0444)
    check: Callable[[int], bool] | None         # range test after parsing; False -> EINVAL
    allowed: str                                # allowed values, in words (error messages)
    doc: str
    words: tuple[str, ...] = ()                 # word knobs: the words in _show() order
    source: Callable[[Sysfs], int] | None = None  # read-only: the value shown
    width: int = 64                             # read-only: bits of the C type shown

    @property
    def writable(self) -> bool:
        return self.parse is not None


def _word_knob(path: str, default: str, words: tuple[str, ...], doc: str) -> Knob:
    return Knob(path, default, sysfs_match_string(words), None, " ".join(words), doc, words)


def _stat_knob(order: int, name: str) -> Knob:
    """One DEFINE_MTHP_STAT_ATTR() file: "%lu\\n" of sum_mthp_stat(order, item)."""
    return Knob(f"hugepages-{order_to_kb(order)}kB/stats/{name}", None, None, None,
                "read-only", f"per-size stat {name} (see vmstat.MTHP_STAT_ITEMS)",
                source=lambda s: s._stats_reader(order, name))


def _counter_knob(name: str) -> Knob:
    """khugepaged/pages_collapsed or full_scans: "%u\\n" of an unsigned int."""
    return Knob(f"khugepaged/{name}", None, None, None, "read-only",
                f"khugepaged counter {name}",
                source=lambda s: s._counter_reader(name), width=32)


def _anon_size_knobs(order: int) -> tuple[Knob, ...]:
    """The anon files of one thpsize_create() directory: enabled + stats/*."""
    kb = order_to_kb(order)
    default = "inherit" if order == HPAGE_PMD_ORDER else "never"
    enabled = _word_knob(f"hugepages-{kb}kB/enabled", default, ANON_ENABLED_MODES,
                         f"anon policy for order {order} ({kb} kB); inherit = top-level enabled")
    return (enabled, *(_stat_knob(order, name) for name in MTHP_STAT_ITEMS))


def _at_most(limit: int) -> Callable[[int], bool]:
    return lambda value: value <= limit


def _nonzero(value: int) -> bool:
    return value != 0


# Defaults are those of hugepage_init()/khugepaged_init() with
# CONFIG_TRANSPARENT_HUGEPAGE_MADVISE=y, as on the lab machine.
KNOBS: tuple[Knob, ...] = (
    _word_knob("enabled", "madvise", GLOBAL_ENABLED_MODES,
               "top-level THP mode; per-size 'inherit' follows it; a store (re)starts khugepaged"),
    _word_knob("defrag", "madvise", DEFRAG_MODES,
               "fault-time allocation effort (vma_thp_gfp_mask)"),
    Knob("use_zero_page", 1, kstrtoul, _at_most(1), "0 or 1",
         "map the huge zero page on read faults (single_hugepage_flag_store)"),
    Knob("hpage_pmd_size", None, None, None, "read-only", "PMD size in bytes",
         source=lambda s: HPAGE_PMD_SIZE),
    Knob("shrink_underused", 1, kstrtobool, None, "a kstrtobool word (1/0, y/n, on/off, ...)",
         "queue new THPs for the underused-split shrinker (split_underused_thp)"),
    _word_knob("thp_cow", "never", THP_COW_MODES,  # series thp_cow v1 2/5
               "PMD-sized COW of shared anon THP: always, only VM_THP_COW (madvise), or never"),
    *(knob for order in ANON_ORDERS for knob in _anon_size_knobs(order)),
    Knob("khugepaged/defrag", 1, kstrtoul, _at_most(1), "0 or 1",
         "khugepaged allocations may reclaim/compact (GFP_TRANSHUGE vs _LIGHT)"),
    Knob("khugepaged/max_ptes_none", KHUGEPAGED_MAX_PTES_LIMIT, any_error_is_einval(kstrtoul),
         _at_most(KHUGEPAGED_MAX_PTES_LIMIT), f"0..{KHUGEPAGED_MAX_PTES_LIMIT}",
         "empty/zero-page PTEs a khugepaged collapse may fill; also the underused threshold"),
    Knob("khugepaged/max_ptes_swap", HPAGE_PMD_NR // 8, any_error_is_einval(kstrtoul),
         _at_most(KHUGEPAGED_MAX_PTES_LIMIT), f"0..{KHUGEPAGED_MAX_PTES_LIMIT}",
         "swap PTEs a khugepaged collapse may swap in"),
    Knob("khugepaged/max_ptes_shared", HPAGE_PMD_NR // 2, any_error_is_einval(kstrtoul),
         _at_most(KHUGEPAGED_MAX_PTES_LIMIT), f"0..{KHUGEPAGED_MAX_PTES_LIMIT}",
         "PTEs of maybe-shared anon pages a khugepaged collapse may take"),
    Knob("khugepaged/pages_to_scan", HPAGE_PMD_NR * 8, any_error_is_einval(kstrtouint),
         _nonzero, f"1..{UINT_MAX}", "PTEs scanned per khugepaged pass"),
    _counter_knob("pages_collapsed"),
    _counter_knob("full_scans"),
    Knob("khugepaged/scan_sleep_millisecs", 10000, any_error_is_einval(kstrtouint), None,
         f"0..{UINT_MAX}", "sleep between passes; a store wakes khugepaged"),
    Knob("khugepaged/alloc_sleep_millisecs", 60000, any_error_is_einval(kstrtouint), None,
         f"0..{UINT_MAX}", "sleep after a failed huge allocation; a store wakes khugepaged"),
)

KNOB_BY_PATH: dict[str, Knob] = {knob.path: knob for knob in KNOBS}
WRITABLE_PATHS: tuple[str, ...] = tuple(k.path for k in KNOBS if k.writable)
_ORDER_ENABLED_PATH = {order: f"hugepages-{order_to_kb(order)}kB/enabled" for order in ANON_ORDERS}


def _build_dirs(paths: Iterable[str]) -> dict[str, list[str]]:
    """Directory -> sorted entries, derived from the file paths."""
    dirs: dict[str, set[str]] = {"": set()}
    for path in paths:
        parts = path.split("/")
        for depth in range(len(parts)):
            parent = "/".join(parts[:depth])
            dirs.setdefault(parent, set()).add(parts[depth])
    return {d: sorted(entries) for d, entries in dirs.items()}


_DIRS = _build_dirs(KNOB_BY_PATH)


def _kernfs_buffer(value: str | bytes) -> tuple[int, str]:
    """Model of fs/kernfs/file.c:kernfs_fop_write_iter(): (count, C string seen by the store).

    At most PAGE_SIZE bytes are taken and a NUL is appended; the store's string
    ends at the first NUL.  Bytes are decoded as latin-1, so non-ASCII input
    never matches a word or a digit.
    """
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogatepass")
    if not isinstance(value, bytes):
        raise TypeError(f"sysfs write needs str or bytes, not {type(value).__name__}")
    data = value[:PAGE_SIZE]
    return len(data), data.split(b"\0", 1)[0].decode("latin-1")


def _show_words(words: tuple[str, ...], active: str) -> str:
    """The bracket format of enabled_show()/defrag_show()/anon_enabled_show()."""
    return " ".join(f"[{w}]" if w == active else w for w in words) + "\n"


# --------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------

def _zero_stat(order: int, name: str) -> int:
    return 0


def _zero_counter(name: str) -> int:
    return 0


class Sysfs:
    """The THP knobs of one simulated kernel, read and written as sysfs files."""

    def __init__(self, stats_reader: StatsReader | None = None,
                 counter_reader: CounterReader | None = None, series_thp_cow: bool = True) -> None:
        # Without the 2026 series applied, its thp_cow file does not exist.
        self._hidden = frozenset() if series_thp_cow else frozenset({"thp_cow"})
        self._stats_reader: StatsReader = stats_reader or _zero_stat
        self._counter_reader: CounterReader = counter_reader or _zero_counter
        self._values: dict[str, Value] = {k.path: k.default for k in KNOBS if k.writable}
        self._listeners: list[Listener] = []
        self._orders_cache: dict[bool, int] = {}

    # ---- file interface ---------------------------------------------------

    def read(self, path: str) -> str:
        """Model of sysfs_kf_seq_show() -> the attribute's _show(): the exact text."""
        knob = self._lookup(f"read {path}", path)
        if knob.source is not None:
            return f"{knob.source(self) & ((1 << knob.width) - 1)}\n"
        value = self._values[knob.path]
        if knob.words:
            return _show_words(knob.words, str(value))
        return f"{value}\n"

    # Contract: on success the knob holds the parsed value, the orders cache is
    # dropped, and every listener runs with (path, old, new) in raw form.  The
    # listeners run on every successful store, even when old == new, because
    # v6.18 runs the side effect on every store: enabled_store() and
    # anon_enabled_store() call start_stop_khugepaged() whenever the write is
    # accepted, and the *_sleep_millisecs stores always wake khugepaged.
    # Errors, each leaving the state unchanged:
    #   ENOENT  no such file;  EISDIR  a directory;
    #   EIO     a read-only attribute (root; see the module docstring);
    #   EINVAL  a parse or range error;  ERANGE  use_zero_page / khugepaged/defrag overflow.
    # A zero-byte write succeeds and does nothing (sysfs_kf_write() returns 0).
    def write(self, path: str, value: str | bytes) -> None:
        """Model of kernfs_fop_write_iter() -> sysfs_kf_write() -> the attribute's _store()."""
        call = f"write {path}"
        knob = self._lookup(call, path)
        count, text = _kernfs_buffer(value)
        if count == 0:
            return
        if not knob.writable:
            raise KernelError(errno.EIO, call, "read-only attribute: kobj_attr_store() "
                              "has no store (a non-root writer gets EACCES from open())")
        self._store(knob, self._parse(call, knob, text))

    def set(self, path: str, value: str | bytes | int) -> None:
        """Shortcut for :meth:`write`; ints (and bools, as 1/0) are written in decimal."""
        if isinstance(value, int):
            value = str(int(value))
        self.write(path, value)

    def listdir(self, path: str = "") -> list[str]:
        """Model of readdir() on the tree (sorted, as `ls` prints it)."""
        rel = self._relative(path).rstrip("/")
        if rel in _DIRS:
            return [n for n in _DIRS[rel] if (f"{rel}/{n}" if rel else n) not in self._hidden]
        if rel in KNOB_BY_PATH:
            raise KernelError(errno.ENOTDIR, f"listdir {path}", "not a directory")
        raise KernelError(errno.ENOENT, f"listdir {path}", f"no such directory under {SYSFS_ROOT}")

    def paths(self) -> list[str]:
        """Every file of the tree, in kernel attribute order."""
        return [knob.path for knob in KNOBS if knob.path not in self._hidden]

    # ---- state ------------------------------------------------------------

    def snapshot(self) -> dict[str, str]:
        """Writable knobs in raw form ("madvise", "511", "1"); cf. thp_save_settings()."""
        return {path: str(value) for path, value in self._values.items()}

    def restore(self, snap: Mapping[str, str]) -> None:
        """Model of the selftests' thp_restore_settings(): all-or-nothing.

        Every entry is checked first (ENOENT/EIO/EINVAL as for write), then the
        knobs that differ are stored.  Listeners run only for those.
        """
        parsed = [self._parse_for_restore(path, text) for path, text in snap.items()]
        for knob, value in parsed:
            if self._values[knob.path] != value:
                self._store(knob, value)

    def add_listener(self, fn: Listener) -> None:
        """Register fn(path, old, new), called after each successful store."""
        self._listeners.append(fn)

    # ---- typed helpers for the mechanisms ---------------------------------

    @property
    def enabled(self) -> str:
        """The top-level mode: "always", "madvise" or "never"."""
        return str(self._values["enabled"])

    @property
    def defrag(self) -> str:
        """One of "always", "defer", "defer+madvise", "madvise", "never"."""
        return str(self._values["defrag"])

    @property
    def use_zero_page(self) -> bool:
        return bool(self._values["use_zero_page"])

    @property
    def shrink_underused(self) -> bool:
        return bool(self._values["shrink_underused"])

    @property
    def thp_cow(self) -> str:  # series thp_cow v1 2/5
        """The series' thp_cow mode: "always", "madvise" or "never"."""
        return str(self._values["thp_cow"])

    @property
    def khugepaged_defrag(self) -> bool:
        return bool(self._values["khugepaged/defrag"])

    @property
    def max_ptes_none(self) -> int:
        return int(self._values["khugepaged/max_ptes_none"])

    @property
    def max_ptes_swap(self) -> int:
        return int(self._values["khugepaged/max_ptes_swap"])

    @property
    def max_ptes_shared(self) -> int:
        return int(self._values["khugepaged/max_ptes_shared"])

    @property
    def pages_to_scan(self) -> int:
        return int(self._values["khugepaged/pages_to_scan"])

    @property
    def scan_sleep_millisecs(self) -> int:
        return int(self._values["khugepaged/scan_sleep_millisecs"])

    @property
    def alloc_sleep_millisecs(self) -> int:
        return int(self._values["khugepaged/alloc_sleep_millisecs"])

    def order_mode(self, order: int) -> str:
        """Per-size anon mode of *order*: "always", "inherit", "madvise" or "never"."""
        path = _ORDER_ENABLED_PATH.get(order)
        if path is None:
            raise ValueError(f"order {order} has no anon sysfs control (orders {ANON_ORDERS[0]}.."
                             f"{ANON_ORDERS[-1]})")
        return str(self._values[path])

    def anon_orders(self, vm_hugepage: bool) -> int:
        """Cached :func:`thp_vma_sysfs_orders` for this tree."""
        key = bool(vm_hugepage)
        mask = self._orders_cache.get(key)
        if mask is None:
            mask = self._orders_cache[key] = self._compute_anon_orders(key)
        return mask

    def global_allows(self, vm_hugepage) -> bool:
        """The top-level ``enabled`` knob allows THP for a VMA (always, or madvise and VM_HUGEPAGE)."""
        return self.enabled == "always" or (self.enabled == "madvise" and bool(vm_hugepage))

    # ---- internals --------------------------------------------------------

    def _compute_anon_orders(self, vm_hugepage: bool) -> int:
        """Model of the anon mask in include/linux/huge_mm.h:thp_vma_allowable_orders()."""
        inherit_ok = self.global_allows(vm_hugepage)
        mask = 0
        for order in ANON_ORDERS:
            mode = self.order_mode(order)
            if (mode == "always" or (mode == "madvise" and vm_hugepage)
                    or (mode == "inherit" and inherit_ok)):
                mask |= 1 << order
        return mask

    def _store(self, knob: Knob, value: Value) -> None:
        """Commit one parsed value, drop the orders cache, run the listeners."""
        old = self._values[knob.path]
        self._values[knob.path] = value
        self._orders_cache.clear()
        for fn in list(self._listeners):
            fn(knob.path, str(old), str(value))

    @staticmethod
    def _parse(call: str, knob: Knob, text: str) -> Value:
        """The _store() body up to the point where it changes state."""
        assert knob.parse is not None
        value = knob.parse(call, text)
        if knob.check is not None and not knob.check(int(value)):
            raise einval(call, f"{text!r} is out of range (allowed: {knob.allowed})")
        return value

    def _parse_for_restore(self, path: str, text: str) -> tuple[Knob, Value]:
        call = f"restore {path}"
        knob = self._lookup(call, path)
        if not knob.writable:
            raise KernelError(errno.EIO, call, "read-only attribute")
        return knob, self._parse(call, knob, text)

    @staticmethod
    def _relative(path: str) -> str:
        """Accept "enabled" or "/sys/kernel/mm/transparent_hugepage/enabled"."""
        if path == SYSFS_ROOT or path.startswith(SYSFS_ROOT + "/"):
            return path[len(SYSFS_ROOT):].lstrip("/")
        return path

    def _lookup(self, call: str, path: str) -> Knob:
        rel = self._relative(path)
        knob = KNOB_BY_PATH.get(rel)
        if knob is not None and rel not in self._hidden:
            return knob
        if rel in _DIRS:
            raise KernelError(errno.EISDIR, call, "is a directory")
        raise KernelError(errno.ENOENT, call, f"no such file under {SYSFS_ROOT}")


def thp_vma_sysfs_orders(sysfs: Sysfs, vm_hugepage: bool) -> int:
    """Model of the sysfs half of include/linux/huge_mm.h:thp_vma_allowable_orders() (anon VMA).

    Returns the bitmask of anon orders the knobs alone allow (bit o = order o):
    S(o)==always, or S(o)==madvise with VM_HUGEPAGE, or S(o)==inherit and
    (G==always or G==madvise with VM_HUGEPAGE).  The VMA, prctl and alignment
    checks of __thp_vma_allowable_orders() are the caller's.  Cached per tree
    and dropped on every store.
    """
    return sysfs.anon_orders(vm_hugepage)
