"""Tests of thpcow.kernel.sysfs: the /sys/kernel/mm/transparent_hugepage/ tree."""

from __future__ import annotations

import errno
import os
import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from thpcow.kernel.constants import ANON_ORDERS, HPAGE_PMD_ORDER, order_to_kb
from thpcow.kernel.errors import KernelError
from thpcow.kernel.sysfs import (
    KNOB_BY_PATH,
    KNOBS,
    SYSFS_ROOT,
    WRITABLE_PATHS,
    Sysfs,
    thp_vma_sysfs_orders,
)
from thpcow.kernel.vmstat import MTHP_STAT_ITEMS

SIZES_KB = [order_to_kb(o) for o in ANON_ORDERS]
WORD_KNOBS = {
    "enabled": ("always", "madvise", "never"),
    "defrag": ("always", "defer", "defer+madvise", "madvise", "never"),
    "thp_cow": ("always", "madvise", "never"),
    **{f"hugepages-{kb}kB/enabled": ("always", "inherit", "madvise", "never") for kb in SIZES_KB},
}
STAT_PATHS = [f"hugepages-{kb}kB/stats/{name}" for kb in SIZES_KB for name in MTHP_STAT_ITEMS]
READ_ONLY = ["hpage_pmd_size", "khugepaged/pages_collapsed", "khugepaged/full_scans", *STAT_PATHS]


@pytest.fixture
def sysfs() -> Sysfs:
    return Sysfs()


def expect_errno(err: int, fn, *args) -> KernelError:
    with pytest.raises(KernelError) as info:
        fn(*args)
    assert info.value.errno == err, str(info.value)
    return info.value


def assert_rejected(sysfs: Sysfs, path: str, value, err: int = errno.EINVAL) -> None:
    """A bad store raises *err* and leaves every knob as it was."""
    before = sysfs.snapshot()
    text = sysfs.read(path)
    expect_errno(err, sysfs.write, path, value)
    assert sysfs.read(path) == text
    assert sysfs.snapshot() == before


# ---------------------------------------------------------------------------
# Default text
# ---------------------------------------------------------------------------

DEFAULT_TEXT = {
    "enabled": "always [madvise] never\n",
    "defrag": "always defer defer+madvise [madvise] never\n",
    "use_zero_page": "1\n",
    "hpage_pmd_size": "2097152\n",
    "shrink_underused": "1\n",
    "thp_cow": "always madvise [never]\n",
    **{f"hugepages-{kb}kB/enabled": "always inherit madvise [never]\n" for kb in SIZES_KB[:-1]},
    "hugepages-2048kB/enabled": "always [inherit] madvise never\n",
    "khugepaged/defrag": "1\n",
    "khugepaged/max_ptes_none": "511\n",
    "khugepaged/max_ptes_swap": "64\n",
    "khugepaged/max_ptes_shared": "256\n",
    "khugepaged/pages_to_scan": "4096\n",
    "khugepaged/pages_collapsed": "0\n",
    "khugepaged/full_scans": "0\n",
    "khugepaged/scan_sleep_millisecs": "10000\n",
    "khugepaged/alloc_sleep_millisecs": "60000\n",
    **{path: "0\n" for path in STAT_PATHS},
}


def test_tree_has_exactly_the_modelled_files(sysfs):
    assert sorted(sysfs.paths()) == sorted(DEFAULT_TEXT)
    assert len(sysfs.paths()) == len(set(sysfs.paths()))


@pytest.mark.parametrize("path", sorted(DEFAULT_TEXT))
def test_default_text(sysfs, path):
    assert sysfs.read(path) == DEFAULT_TEXT[path]


def test_defaults_through_typed_helpers(sysfs):
    assert (sysfs.enabled, sysfs.defrag, sysfs.thp_cow) == ("madvise", "madvise", "never")
    assert sysfs.use_zero_page is True and sysfs.shrink_underused is True
    assert sysfs.khugepaged_defrag is True
    assert (sysfs.max_ptes_none, sysfs.max_ptes_swap, sysfs.max_ptes_shared) == (511, 64, 256)
    assert sysfs.pages_to_scan == 4096
    assert (sysfs.scan_sleep_millisecs, sysfs.alloc_sleep_millisecs) == (10000, 60000)
    assert [sysfs.order_mode(o) for o in ANON_ORDERS] == ["never"] * 7 + ["inherit"]


def test_knob_table_rows_are_consistent():
    assert [k.path for k in KNOBS] == list(KNOB_BY_PATH)
    for knob in KNOBS:
        assert knob.doc and knob.allowed
        assert (knob.default is None) == (not knob.writable)
        assert knob.writable or knob.source is not None
    assert WRITABLE_PATHS == tuple(Sysfs().snapshot())


# ---------------------------------------------------------------------------
# Conformance with the running kernel (read only; never writes /sys)
# ---------------------------------------------------------------------------

def _real(path: str) -> str | None:
    try:
        with open(os.path.join(SYSFS_ROOT, path)) as f:
            return f.read()
    except FileNotFoundError:
        return None


def _real_value(path: str, text: str):
    """The value a real file shows: the bracketed word, or the number."""
    if path in WORD_KNOBS:
        match = re.search(r"\[([^\]]+)\]", text)
        return match.group(1) if match else None
    return int(text)


needs_real_tree = pytest.mark.skipif(not os.path.isdir(SYSFS_ROOT),
                                     reason=f"{SYSFS_ROOT} absent: no THP on this kernel")


@pytest.mark.realkernel
@needs_real_tree
@pytest.mark.parametrize("path", [*WRITABLE_PATHS, "hpage_pmd_size"])
def test_default_text_matches_running_kernel(sysfs, path):
    real = _real(path)
    if real is None:
        pytest.skip(f"{path} does not exist on this kernel (thp_cow is the 2026 series)")
    default = KNOB_BY_PATH[path].default
    if path != "hpage_pmd_size" and _real_value(path, real) != default:
        pytest.skip(f"{path} is not at its default on this machine ({real.strip()!r})")
    assert sysfs.read(path) == real


@pytest.mark.realkernel
@needs_real_tree
@pytest.mark.parametrize("path", ["khugepaged/pages_collapsed", "khugepaged/full_scans",
                                  *STAT_PATHS])
def test_counter_format_matches_running_kernel(path):
    real = _real(path)
    assert real is not None, f"{path} missing on the running kernel"
    assert re.fullmatch(r"\d+\n", real)
    value = int(real)
    model = Sysfs(stats_reader=lambda o, n: value, counter_reader=lambda n: value)
    assert model.read(path) == real


@pytest.mark.realkernel
@needs_real_tree
def test_anon_sizes_match_running_kernel(sysfs):
    real_sizes = sorted(d for d in os.listdir(SYSFS_ROOT)
                        if d.startswith("hugepages-") and os.path.exists(
                            os.path.join(SYSFS_ROOT, d, "enabled")))
    model_sizes = sorted(d for d in sysfs.listdir() if d.startswith("hugepages-"))
    assert model_sizes == real_sizes
    real_khugepaged = sorted(os.listdir(os.path.join(SYSFS_ROOT, "khugepaged")))
    assert sysfs.listdir("khugepaged") == real_khugepaged


# ---------------------------------------------------------------------------
# Word knobs: enabled, defrag, hugepages-*/enabled, thp_cow
# ---------------------------------------------------------------------------

WORD_CASES = [(path, word) for path, words in WORD_KNOBS.items() for word in words]


@pytest.mark.parametrize("path,word", WORD_CASES)
@pytest.mark.parametrize("suffix", ["", "\n"])
def test_word_knob_accepts_each_word(sysfs, path, word, suffix):
    sysfs.write(path, word + suffix)
    expected = " ".join(f"[{w}]" if w == word else w for w in WORD_KNOBS[path]) + "\n"
    assert sysfs.read(path) == expected
    assert sysfs.snapshot()[path] == word


@pytest.mark.parametrize("path", sorted(WORD_KNOBS))
@pytest.mark.parametrize("bad", [
    " always", "always ", "Always", "ALWAYS", "always\n\n", "\nalways", "alwaysx", "alway",
    "\n", "\0", "never\r\n", "never\t", "madvise never", "[madvise]", "1", "yes",
    "défer", "\0always",
])
def test_word_knob_rejects_near_misses(sysfs, path, bad):
    assert_rejected(sysfs, path, bad)


@pytest.mark.parametrize("path,bad", [
    ("enabled", "inherit"),            # per-size word, not a global one
    ("enabled", "defer"),
    ("thp_cow", "inherit"),
    ("defrag", "defer madvise"),
    ("defrag", "defer+"),
    ("hugepages-2048kB/enabled", "defer+madvise"),
])
def test_word_knob_rejects_words_of_other_knobs(sysfs, path, bad):
    assert_rejected(sysfs, path, bad)


def test_einval_message_names_value_and_allowed_words(sysfs):
    err = expect_errno(errno.EINVAL, sysfs.write, "enabled", "sometimes")
    assert "'sometimes'" in str(err) and "always madvise never" in str(err)
    assert err.call == "write enabled"


def test_store_sees_text_only_up_to_the_first_nul(sysfs):
    # kernfs NUL-terminates the buffer; the store's C string ends at the first NUL.
    sysfs.write("enabled", "always\0garbage")
    assert sysfs.enabled == "always"
    sysfs.write("khugepaged/max_ptes_none", b"7\0xyz")
    assert sysfs.max_ptes_none == 7


def test_write_is_cut_at_page_size(sysfs):
    # Only PAGE_SIZE bytes reach the store: the trailing "x" is never seen.
    sysfs.write("khugepaged/scan_sleep_millisecs", "0" * 4095 + "7" + "x")
    assert sysfs.scan_sleep_millisecs == 7
    assert_rejected(sysfs, "khugepaged/scan_sleep_millisecs", "0" * 4094 + "7" + "x")


def test_zero_length_write_is_a_silent_no_op(sysfs):
    calls = []
    sysfs.add_listener(lambda *a: calls.append(a))
    before = sysfs.snapshot()
    for path in [*WRITABLE_PATHS, *READ_ONLY]:
        sysfs.write(path, "")
        sysfs.write(path, b"")
    assert sysfs.snapshot() == before and calls == []


def test_bytes_are_accepted_and_non_ascii_never_matches(sysfs):
    sysfs.write("defrag", b"defer+madvise\n")
    assert sysfs.defrag == "defer+madvise"
    assert_rejected(sysfs, "defrag", "nevér")
    assert_rejected(sysfs, "defrag", b"\xffnever")


# ---------------------------------------------------------------------------
# Numeric knobs: kstrtoul / kstrtouint / kstrtobool as the kernel uses them
# ---------------------------------------------------------------------------

FLAG_VALID = [("0", 0), ("1", 1), ("1\n", 1), ("+1", 1), ("+0\n", 0), ("01", 1), ("0000", 0)]
FLAG_INVALID = [
    ("2", errno.EINVAL), ("18446744073709551615", errno.EINVAL),   # parses, fails "value > 1"
    ("-1", errno.EINVAL), ("-0", errno.EINVAL), (" 1", errno.EINVAL), ("1 ", errno.EINVAL),
    ("0x1", errno.EINVAL), ("1\n\n", errno.EINVAL), ("\n", errno.EINVAL), ("++1", errno.EINVAL),
    ("+", errno.EINVAL), ("1.0", errno.EINVAL), ("y", errno.EINVAL), ("on", errno.EINVAL),
    ("١", errno.EINVAL),                                           # a non-ASCII digit
    ("18446744073709551616", errno.ERANGE),                        # kstrtoul overflow: passed on
    ("99999999999999999999999x", errno.ERANGE),                    # overflow is checked first
]


@pytest.mark.parametrize("path", ["use_zero_page", "khugepaged/defrag"])
@pytest.mark.parametrize("text,value", FLAG_VALID)
def test_flag_knob_valid(sysfs, path, text, value):
    sysfs.write(path, "1" if value == 0 else "0")
    sysfs.write(path, text)
    assert sysfs.read(path) == f"{value}\n"


@pytest.mark.parametrize("path", ["use_zero_page", "khugepaged/defrag"])
@pytest.mark.parametrize("text,err", FLAG_INVALID)
def test_flag_knob_invalid(sysfs, path, text, err):
    assert_rejected(sysfs, path, text, err)


def test_flag_helpers_are_bools(sysfs):
    sysfs.write("use_zero_page", "0")
    sysfs.write("khugepaged/defrag", "0\n")
    assert sysfs.use_zero_page is False and sysfs.khugepaged_defrag is False


MAX_PTES = ["khugepaged/max_ptes_none", "khugepaged/max_ptes_swap", "khugepaged/max_ptes_shared"]


@pytest.mark.parametrize("path", MAX_PTES)
@pytest.mark.parametrize("text,value", [("0", 0), ("511", 511), ("+511\n", 511), ("007", 7)])
def test_max_ptes_valid(sysfs, path, text, value):
    sysfs.write(path, text)
    assert sysfs.read(path) == f"{value}\n"
    assert getattr(sysfs, path.split("/")[1]) == value


@pytest.mark.parametrize("path", MAX_PTES)
@pytest.mark.parametrize("text", [
    "512", "1000", "-1", "0x1ff", " 5", "5 ", "5\n\n", "abc", "5k",
    "18446744073709551616",      # ERANGE from kstrtoul, but khugepaged stores return EINVAL
])
def test_max_ptes_invalid(sysfs, path, text):
    assert_rejected(sysfs, path, text, errno.EINVAL)


@pytest.mark.parametrize("text,value", [("1", 1), ("4294967295", 4294967295), ("+8\n", 8)])
def test_pages_to_scan_valid(sysfs, text, value):
    sysfs.write("khugepaged/pages_to_scan", text)
    assert sysfs.pages_to_scan == value
    assert sysfs.read("khugepaged/pages_to_scan") == f"{value}\n"


@pytest.mark.parametrize("text", ["0", "0\n", "+0", "4294967296", "-1", "0x10", " 1", "1e3"])
def test_pages_to_scan_invalid(sysfs, text):
    assert_rejected(sysfs, "khugepaged/pages_to_scan", text, errno.EINVAL)


SLEEPS = ["khugepaged/scan_sleep_millisecs", "khugepaged/alloc_sleep_millisecs"]


@pytest.mark.parametrize("path", SLEEPS)
@pytest.mark.parametrize("text,value", [("0", 0), ("4294967295", 4294967295), ("+100\n", 100)])
def test_sleep_valid(sysfs, path, text, value):
    sysfs.write(path, text)
    assert getattr(sysfs, path.split("/")[1]) == value


@pytest.mark.parametrize("path", SLEEPS)
@pytest.mark.parametrize("text", ["4294967296", "99999999999999999999", "-1", "1s", "0x10", "1 "])
def test_sleep_invalid(sysfs, path, text):
    assert_rejected(sysfs, path, text, errno.EINVAL)


@pytest.mark.parametrize("text,value", [
    ("1", 1), ("0", 0), ("1\n", 1), ("y", 1), ("Y", 1), ("yes", 1), ("n", 0), ("no\n", 0),
    ("on", 1), ("ON", 1), ("off", 0), ("oF", 0), ("t", 1), ("true", 1), ("f", 0), ("False", 0),
    ("e", 1), ("enabled", 1), ("d", 0), ("disable", 0),
    # kstrtobool only looks at one or two characters:
    ("yesterday", 1), ("1234", 1), ("0xff", 0), ("nonsense", 0), ("onion", 1), ("of", 0),
])
def test_shrink_underused_valid(sysfs, text, value):
    sysfs.write("shrink_underused", "0" if value else "1")
    sysfs.write("shrink_underused", text)
    assert sysfs.read("shrink_underused") == f"{value}\n"
    assert sysfs.shrink_underused is bool(value)


@pytest.mark.parametrize("text", ["2", "-1", " 1", "\n", "o", "O\n", "ox", "x", "+1", "\0"])
def test_shrink_underused_invalid(sysfs, text):
    assert_rejected(sysfs, "shrink_underused", text, errno.EINVAL)


def test_set_writes_ints_and_bools_in_decimal(sysfs):
    sysfs.set("khugepaged/max_ptes_none", 0)
    sysfs.set("use_zero_page", False)
    sysfs.set("enabled", "always")
    assert (sysfs.max_ptes_none, sysfs.use_zero_page, sysfs.enabled) == (0, False, "always")
    expect_errno(errno.EINVAL, sysfs.set, "khugepaged/max_ptes_none", 512)


def test_write_rejects_non_text(sysfs):
    with pytest.raises(TypeError):
        sysfs.write("enabled", 1)


# ---------------------------------------------------------------------------
# Read-only files, unknown paths, directories
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("path", READ_ONLY)
def test_read_only_file_refuses_writes_with_eio(sysfs, path):
    text = sysfs.read(path)
    err = expect_errno(errno.EIO, sysfs.write, path, "0")
    assert "read-only" in str(err)
    assert sysfs.read(path) == text


@pytest.mark.parametrize("path", ["bogus", "khugepaged/bogus", "hugepages-8kB/enabled",
                                  "hugepages-4096kB/enabled", "shmem_enabled", "Enabled",
                                  "enabled/", "/enabled", "hugepages-16kB/stats/shmem_alloc"])
def test_unknown_path_is_enoent(sysfs, path):
    expect_errno(errno.ENOENT, sysfs.read, path)
    expect_errno(errno.ENOENT, sysfs.write, path, "1")


def test_absolute_paths_are_accepted(sysfs):
    sysfs.write(f"{SYSFS_ROOT}/enabled", "never")
    assert sysfs.read(f"{SYSFS_ROOT}/enabled") == "always madvise [never]\n"
    assert sysfs.listdir(SYSFS_ROOT) == sysfs.listdir()


def test_directories(sysfs):
    expect_errno(errno.EISDIR, sysfs.read, "khugepaged")
    expect_errno(errno.EISDIR, sysfs.write, "hugepages-16kB", "never")
    expect_errno(errno.ENOTDIR, sysfs.listdir, "enabled")
    expect_errno(errno.ENOENT, sysfs.listdir, "nope")
    assert sysfs.listdir("hugepages-64kB") == ["enabled", "stats"]
    assert sysfs.listdir("hugepages-64kB/stats") == sorted(MTHP_STAT_ITEMS)
    assert sysfs.listdir("khugepaged") == sorted([
        "defrag", "max_ptes_none", "max_ptes_swap", "max_ptes_shared", "pages_to_scan",
        "pages_collapsed", "full_scans", "scan_sleep_millisecs", "alloc_sleep_millisecs"])
    root = sysfs.listdir("")
    assert root == sorted(root)
    assert {"enabled", "defrag", "use_zero_page", "hpage_pmd_size", "shrink_underused",
            "thp_cow", "khugepaged"} <= set(root)
    assert [d for d in root if d.startswith("hugepages-")] == sorted(
        f"hugepages-{kb}kB" for kb in SIZES_KB)


def test_listdir_agrees_with_paths(sysfs):
    def walk(d: str) -> list[str]:
        out = []
        for name in sysfs.listdir(d):
            full = f"{d}/{name}" if d else name
            out += walk(full) if full not in KNOB_BY_PATH else [full]
        return out
    assert sorted(walk("")) == sorted(sysfs.paths())


# ---------------------------------------------------------------------------
# Readers for stats and counters
# ---------------------------------------------------------------------------

def test_stats_reader_gets_order_and_name():
    seen = []

    def reader(order: int, name: str) -> int:
        seen.append((order, name))
        return order * 1000 + MTHP_STAT_ITEMS.index(name)

    sysfs = Sysfs(stats_reader=reader)
    split, nr_anon = MTHP_STAT_ITEMS.index("split"), MTHP_STAT_ITEMS.index("nr_anon")
    assert sysfs.read("hugepages-64kB/stats/split") == f"{4000 + split}\n"
    assert sysfs.read("hugepages-2048kB/stats/nr_anon") == f"{9000 + nr_anon}\n"
    assert seen == [(4, "split"), (9, "nr_anon")]


def test_counter_reader_and_unsigned_int_width():
    counters = {"pages_collapsed": 12, "full_scans": 2**32 + 3}
    sysfs = Sysfs(counter_reader=counters.__getitem__)
    assert sysfs.read("khugepaged/pages_collapsed") == "12\n"
    assert sysfs.read("khugepaged/full_scans") == "3\n"        # "%u" of an unsigned int


# ---------------------------------------------------------------------------
# Listeners
# ---------------------------------------------------------------------------

def test_listener_called_after_successful_store(sysfs):
    calls = []
    sysfs.add_listener(lambda path, old, new: calls.append((path, old, new, sysfs.read(path))))
    sysfs.write("enabled", "always\n")
    sysfs.write("khugepaged/pages_to_scan", "+8")
    sysfs.write("hugepages-64kB/enabled", "madvise")
    assert calls == [
        ("enabled", "madvise", "always", "[always] madvise never\n"),   # state already changed
        ("khugepaged/pages_to_scan", "4096", "8", "8\n"),
        ("hugepages-64kB/enabled", "never", "madvise", "always inherit [madvise] never\n"),
    ]


def test_listener_runs_on_same_value_store_but_not_on_failure(sysfs):
    calls = []
    sysfs.add_listener(lambda *a: calls.append(a))
    sysfs.write("enabled", "madvise")          # v6.18 calls start_stop_khugepaged() anyway
    with pytest.raises(KernelError):
        sysfs.write("enabled", "bogus")
    with pytest.raises(KernelError):
        sysfs.write("hpage_pmd_size", "1")
    assert calls == [("enabled", "madvise", "madvise")]


def test_every_listener_is_called(sysfs):
    a, b = [], []
    sysfs.add_listener(lambda *x: a.append(x))
    sysfs.add_listener(lambda *x: b.append(x))
    sysfs.write("thp_cow", "madvise")
    assert a == b == [("thp_cow", "never", "madvise")]


# ---------------------------------------------------------------------------
# snapshot / restore
# ---------------------------------------------------------------------------

def test_snapshot_has_writable_knobs_in_raw_form(sysfs):
    snap = sysfs.snapshot()
    assert set(snap) == set(WRITABLE_PATHS)
    assert not set(snap) & set(READ_ONLY)
    assert snap["enabled"] == "madvise" and snap["khugepaged/max_ptes_none"] == "511"
    assert snap["shrink_underused"] == "1" and snap["hugepages-2048kB/enabled"] == "inherit"


def test_restore_round_trip(sysfs):
    saved = sysfs.snapshot()
    texts = {p: sysfs.read(p) for p in sysfs.paths()}
    for path, value in [("enabled", "always"), ("defrag", "never"), ("use_zero_page", "0"),
                        ("shrink_underused", "off"), ("thp_cow", "always"),
                        ("hugepages-16kB/enabled", "always"), ("khugepaged/max_ptes_none", "0"),
                        ("khugepaged/pages_to_scan", "1"),
                        ("khugepaged/alloc_sleep_millisecs", "5")]:
        sysfs.write(path, value)
    assert sysfs.snapshot() != saved
    calls = []
    sysfs.add_listener(lambda *a: calls.append(a))
    sysfs.restore(saved)
    assert sysfs.snapshot() == saved
    assert {p: sysfs.read(p) for p in sysfs.paths()} == texts
    assert len(calls) == 9 and ("enabled", "always", "madvise") in calls


def test_restore_is_all_or_nothing(sysfs):
    sysfs.write("enabled", "always")
    before = sysfs.snapshot()
    bad = {**sysfs.snapshot(), "enabled": "never", "khugepaged/max_ptes_none": "512"}
    expect_errno(errno.EINVAL, sysfs.restore, bad)
    assert sysfs.snapshot() == before
    expect_errno(errno.ENOENT, sysfs.restore, {"enabled": "never", "nope": "1"})
    expect_errno(errno.EIO, sysfs.restore, {"enabled": "never", "hpage_pmd_size": "1"})
    assert sysfs.snapshot() == before


def test_snapshots_are_independent_copies(sysfs):
    snap = sysfs.snapshot()
    snap["enabled"] = "never"
    assert sysfs.enabled == "madvise"
    other = Sysfs()
    sysfs.write("enabled", "always")
    assert other.enabled == "madvise"


# ---------------------------------------------------------------------------
# thp_vma_sysfs_orders (kernel-semantics.md §2.2)
# ---------------------------------------------------------------------------

PMD_BIT = 1 << HPAGE_PMD_ORDER

# (global, PMD per-size, VM_HUGEPAGE) -> may the fault use a PMD THP?  Written out
# case by case rather than computed from the formula.
PMD_TRUTH = {
    ("always", "always", False): True, ("always", "always", True): True,
    ("madvise", "always", False): True, ("madvise", "always", True): True,
    ("never", "always", False): True, ("never", "always", True): True,
    ("always", "madvise", False): False, ("always", "madvise", True): True,
    ("madvise", "madvise", False): False, ("madvise", "madvise", True): True,
    ("never", "madvise", False): False, ("never", "madvise", True): True,
    ("always", "inherit", False): True, ("always", "inherit", True): True,
    ("madvise", "inherit", False): False, ("madvise", "inherit", True): True,
    ("never", "inherit", False): False, ("never", "inherit", True): False,
    ("always", "never", False): False, ("always", "never", True): False,
    ("madvise", "never", False): False, ("madvise", "never", True): False,
    ("never", "never", False): False, ("never", "never", True): False,
}


@pytest.mark.parametrize("glob,pmd,vm_hugepage", sorted(PMD_TRUTH))
def test_pmd_order_truth_table(sysfs, glob, pmd, vm_hugepage):
    sysfs.write("enabled", glob)
    sysfs.write("hugepages-2048kB/enabled", pmd)
    mask = thp_vma_sysfs_orders(sysfs, vm_hugepage)
    assert bool(mask & PMD_BIT) is PMD_TRUTH[(glob, pmd, vm_hugepage)]
    assert mask & ~PMD_BIT == 0          # the other sizes are still "never"


def test_global_never_with_pmd_inherit_means_no_thp_even_with_madv_hugepage(sysfs):
    sysfs.write("enabled", "never")
    assert sysfs.order_mode(HPAGE_PMD_ORDER) == "inherit"
    assert thp_vma_sysfs_orders(sysfs, vm_hugepage=True) == 0


def test_pmd_always_gives_thp_even_when_global_never(sysfs):
    sysfs.write("enabled", "never")
    sysfs.write("hugepages-2048kB/enabled", "always")
    assert thp_vma_sysfs_orders(sysfs, vm_hugepage=False) == PMD_BIT


def test_default_machine_gives_pmd_thp_only_with_madv_hugepage(sysfs):
    assert thp_vma_sysfs_orders(sysfs, vm_hugepage=False) == 0
    assert thp_vma_sysfs_orders(sysfs, vm_hugepage=True) == PMD_BIT


def test_mixed_sizes_mask(sysfs):
    sysfs.write("hugepages-16kB/enabled", "madvise")      # order 2
    sysfs.write("hugepages-64kB/enabled", "always")       # order 4
    sysfs.write("hugepages-256kB/enabled", "inherit")     # order 6
    assert thp_vma_sysfs_orders(sysfs, False) == 1 << 4
    assert thp_vma_sysfs_orders(sysfs, True) == (1 << 2) | (1 << 4) | (1 << 6) | PMD_BIT
    sysfs.write("enabled", "always")
    assert thp_vma_sysfs_orders(sysfs, False) == (1 << 4) | (1 << 6) | PMD_BIT


def test_orders_cache_is_dropped_on_store_and_restore(sysfs):
    saved = sysfs.snapshot()
    assert thp_vma_sysfs_orders(sysfs, True) == PMD_BIT
    sysfs.write("hugepages-2048kB/enabled", "never")
    assert thp_vma_sysfs_orders(sysfs, True) == 0
    with pytest.raises(KernelError):
        sysfs.write("hugepages-2048kB/enabled", "always ")
    assert thp_vma_sysfs_orders(sysfs, True) == 0
    sysfs.restore(saved)
    assert thp_vma_sysfs_orders(sysfs, True) == PMD_BIT


def test_thp_cow_and_defrag_do_not_change_the_orders(sysfs):
    before = (thp_vma_sysfs_orders(sysfs, False), thp_vma_sysfs_orders(sysfs, True))
    sysfs.write("thp_cow", "always")
    sysfs.write("defrag", "never")
    assert (thp_vma_sysfs_orders(sysfs, False), thp_vma_sysfs_orders(sysfs, True)) == before


@pytest.mark.parametrize("order", [0, 1, 10, -1])
def test_order_mode_rejects_orders_without_a_control(sysfs, order):
    with pytest.raises(ValueError):
        sysfs.order_mode(order)


# ---------------------------------------------------------------------------
# Properties (hypothesis)
# ---------------------------------------------------------------------------

def _c_string(value: str | bytes) -> tuple[int, bytes]:
    """What a store sees: at most 4096 bytes, cut at the first NUL."""
    data = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
    data = data[:4096]
    return len(data), data.split(b"\0", 1)[0]


def _word_accepted(value: str | bytes, words: tuple[str, ...]) -> bool:
    count, seen = _c_string(value)
    if count == 0:
        return True                       # a zero-byte write is a successful no-op
    return any(seen in (w.encode(), w.encode() + b"\n") for w in words)


_word_alphabet = st.sampled_from(list("alwysmdvinerhtf+[] \n\t\0AMNX1") + ["é", "\r"])
_near_words = st.builds(
    lambda word, pre, post: pre + word + post,
    st.sampled_from(sorted({w for ws in WORD_KNOBS.values() for w in ws})),
    st.text(_word_alphabet, max_size=2), st.text(_word_alphabet, max_size=2))


@settings(max_examples=300, deadline=None)
@given(path=st.sampled_from(sorted(WORD_KNOBS)),
       value=st.one_of(st.text(max_size=20), st.text(_word_alphabet, max_size=16), _near_words,
                       st.binary(max_size=16)))
def test_any_non_word_is_einval_and_changes_nothing(path, value):
    assume(not _word_accepted(value, WORD_KNOBS[path]))
    sysfs = Sysfs()
    sysfs.write("thp_cow", "madvise")            # a non-default state to preserve
    sysfs.write("hugepages-32kB/enabled", "always")
    before = sysfs.snapshot()
    orders = thp_vma_sysfs_orders(sysfs, True)
    expect_errno(errno.EINVAL, sysfs.write, path, value)
    assert sysfs.snapshot() == before
    assert thp_vma_sysfs_orders(sysfs, True) == orders


@settings(max_examples=200, deadline=None)
@given(path=st.sampled_from(sorted(WORD_KNOBS)), data=st.data())
def test_every_word_with_optional_newline_is_accepted(path, data):
    word = data.draw(st.sampled_from(WORD_KNOBS[path]))
    tail = data.draw(st.sampled_from(["", "\n", "\0", "\n\0junk", "\0\n\n"]))
    sysfs = Sysfs()
    sysfs.write(path, word + tail)
    assert sysfs.snapshot()[path] == word


_DECIMAL = re.compile(rb"\+?[0-9]+\n?")
_RANGES = {
    "use_zero_page": (0, 1), "khugepaged/defrag": (0, 1),
    "khugepaged/max_ptes_none": (0, 511), "khugepaged/max_ptes_swap": (0, 511),
    "khugepaged/max_ptes_shared": (0, 511),
    "khugepaged/pages_to_scan": (1, 2**32 - 1),
    "khugepaged/scan_sleep_millisecs": (0, 2**32 - 1),
    "khugepaged/alloc_sleep_millisecs": (0, 2**32 - 1),
}


@settings(max_examples=300, deadline=None)
@given(path=st.sampled_from(sorted(_RANGES)), data=st.data())
def test_numeric_knobs_accept_exactly_their_range(path, data):
    lo, hi = _RANGES[path]
    value = data.draw(st.integers(min_value=0, max_value=2**70))
    text = data.draw(st.sampled_from(["{}", "+{}", "{}\n", "00{}"])).format(value)
    sysfs = Sysfs()
    before = sysfs.snapshot()
    if lo <= value <= hi:
        sysfs.write(path, text)
        assert sysfs.read(path) == f"{value}\n"
        return
    err = expect_errno(errno.ERANGE if path in ("use_zero_page", "khugepaged/defrag")
                       and value >= 2**64 else errno.EINVAL, sysfs.write, path, text)
    assert err.errno in (errno.EINVAL, errno.ERANGE)
    assert sysfs.snapshot() == before


@settings(max_examples=300, deadline=None)
@given(path=st.sampled_from(sorted(_RANGES)),
       value=st.one_of(st.text(max_size=12), st.text(st.sampled_from(list("0123456789+- \nx\0")),
                                                     max_size=8)))
def test_numeric_knobs_reject_non_decimal_text(path, value):
    count, seen = _c_string(value)
    assume(count > 0 and not _DECIMAL.fullmatch(seen))
    sysfs = Sysfs()
    before = sysfs.snapshot()
    expect_errno(errno.EINVAL, sysfs.write, path, value)
    assert sysfs.snapshot() == before
