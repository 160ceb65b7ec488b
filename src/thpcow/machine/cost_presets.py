"""Cost presets: latency profiles of other CPUs and kernels, and the machine's own cached profile.

A cost preset is a :class:`~thpcow.machine.latency.CalibrationProfile` built
from the reference profile (the lab VM of calibration.md) with the costs that
a published measurement changes.  Each preset names its sources in
``source``; what no source gives keeps the reference value and is called an
assumption there.  Bandwidths become costs as 2 MiB / bandwidth, plus the
part of the reference fault that is not the clear or copy (allocation, page
table updates), which is an assumption for every other CPU.

The machine's own profile (what ``thpcow calibrate`` measured here) is cached
under :func:`cache_dir` as ``<cpu_id>--<kernel>.toml``; :func:`select` picks,
when no profile is named: the cached profile of this CPU and kernel, else the
preset whose ``cpu_id`` is this CPU's, else the reference profile.
``THPCOW_PROFILE_CACHE`` overrides the cache directory; ``off`` turns the cache
off (the test suite does, so that no file on the machine changes a result).
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass, replace
from pathlib import Path

from .latency import DEFAULT_PROFILE, HPAGE_PMD_SIZE, CalibrationProfile

US = 1000.0

# The reference THP fault is 221 us; clearing 2 MiB at the 9.5 GB/s it implies is nearly all of it.
# Assumption: 10 us of it is the rest of the fault (allocation, PMD install, accounting).
_THP_FAULT_REST_NS = 10 * US


def _clear_ns(gbps: float) -> float:
    return HPAGE_PMD_SIZE / gbps + _THP_FAULT_REST_NS


def _copy_ns(gbps: float) -> float:
    return HPAGE_PMD_SIZE / gbps


_GENOA_CLEAR = ("Linux commit 'mm: folio_zero_user: clear pages sequentially' (A. Arora, 2026-01-06, "
                "in v7.0 with x86 clear_pages()): 2 MiB demand-fault clearing on AMD Genoa 11.76 -> "
                "23.58 GB/s")
_ZEN5_COPY = ("RFC 'mm: batch page copies in folio_copy() and folio_mc_copy()' (S. Garg, linux-mm, "
              "2026-04-27): 2 MiB folio copy on AMD EPYC 9655 (Zen 5), source evicted, DRAM0 -> DRAM1, "
              "18.65 -> 38.03 GB/s")
_REST = "; every other cost: the reference lab VM (assumption)"

PRESETS: dict[str, CalibrationProfile] = {
    "lab-vm-zen4-warm": DEFAULT_PROFILE,
    # AMD Genoa (Zen 4), v6.18: the THP fault clears 2 MiB a page at a time, 11.76 GB/s.
    "amd-genoa-v6.18": replace(
        DEFAULT_PROFILE, name="amd-genoa-v6.18", kernel="6.18", cpu="AMD EPYC 9004 (Zen 4 / Genoa)",
        cpu_id="AuthenticAMD:25:17", source=_GENOA_CLEAR + " (before)" + _REST,
        fault_thp_zero_ns=_clear_ns(11.76)),
    # AMD Genoa, v7.0: folio_zero_user() clears the 2 MiB sequentially with clear_pages(): 23.58 GB/s.
    "amd-genoa-v7.0-clear-pages": replace(
        DEFAULT_PROFILE, name="amd-genoa-v7.0-clear-pages", kernel="7.0", cpu="AMD EPYC 9004 (Zen 4 / Genoa)",
        cpu_id="", source=_GENOA_CLEAR + " (after)" + _REST,
        fault_thp_zero_ns=_clear_ns(23.58)),
    # AMD Turin (Zen 5): a 2 MiB folio copy a page at a time, 18.65 GB/s.
    "amd-zen5-turin": replace(
        DEFAULT_PROFILE, name="amd-zen5-turin", kernel="7.1", cpu="AMD EPYC 9005 (Zen 5 / Turin)",
        cpu_id="AuthenticAMD:26:2", source=_ZEN5_COPY + " (before)" + _REST,
        copy_2m_ns=_copy_ns(18.65)),
    # AMD Turin with the batched folio copy (one memcpy over the folio): 38.03 GB/s.
    "amd-zen5-turin-batched-copy": replace(
        DEFAULT_PROFILE, name="amd-zen5-turin-batched-copy", kernel="7.1+rfc", cpu="AMD EPYC 9005 (Zen 5 / Turin)",
        cpu_id="", source=_ZEN5_COPY + " (after)" + _REST,
        copy_2m_ns=_copy_ns(38.03)),
    # Intel Xeon family 6 model 207 (Emerald Rapids) as a 2-vCPU KVM guest, Linux 6.18: measured with
    # `thpcow calibrate` (CPU time, warm) on 2026-12-05; fork_base stays the reference's (the
    # calibrated one, 0.77 ms, is the Python interpreter's own fork).
    "intel-xeon-6-207-kvm": replace(
        DEFAULT_PROFILE, name="intel-xeon-6-207-kvm", kernel="6.18.44-fc-v1252",
        cpu="Intel(R) Xeon(R) Processor (family 6 model 207), KVM guest, 2 vCPUs", cpu_id="GenuineIntel:6:207",
        source="thpcow calibrate (full, warm, CPU time) on a 2-vCPU KVM guest, Linux 6.18.44, 2026-12-05; "
               "fork_base, compaction, swap, TLB shootdown, THP fallback: the reference (assumption)",
        fault_4k_zero_ns=1452.5, fault_thp_zero_ns=238_250.9, zero_page_read_ns=600.8, huge_zero_read_ns=1421.4,
        cow_4k_ns=2186.6, copy_4k_ns=613.1, copy_2m_ns=286_160.8, split_pmd_ns=5650.0, fork_pmd_ns=964.0,
        fork_pte_ns=31.56, fork_pte_table_ns=2126.3, exit_pte_ns=43.26, exit_pte_table_ns=1172.8,
        exit_pmd_ns=458.9, cow_dense_4k_ns=0.0, collapse_ns=269_140.0, reuse_4k_ns=803.6, reuse_thp_ns=758.2),
}


class ProfileChoiceError(ValueError):
    """A --profile that is neither a file nor a preset; the message names both."""


def preset(name: str) -> CalibrationProfile:
    """The preset ``name``; ProfileChoiceError naming the presets if there is none."""
    if name not in PRESETS:
        raise ProfileChoiceError(f"'{name}': no such profile file or preset (presets: {', '.join(PRESETS)})")
    return PRESETS[name]


def host_cpu_id(cpuinfo: str = "/proc/cpuinfo") -> str:
    """``vendor:family:model`` of this machine's first CPU ("GenuineIntel:6:207"), or ""."""
    want = {"vendor_id": "", "cpu family": "", "model": ""}
    try:
        with open(cpuinfo) as fh:
            for line in fh:
                if not line.strip():
                    break
                key, _, val = line.partition(":")
                if key.strip() in want:
                    want[key.strip()] = val.strip()
    except OSError:
        return ""
    return ":".join(want.values()) if all(want.values()) else ""


def host_kernel() -> str:
    return platform.release()


def cache_dir() -> Path | None:
    """Where the machine's profiles are cached; None when ``THPCOW_PROFILE_CACHE=off``."""
    env = os.environ.get("THPCOW_PROFILE_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("", "off", "0", "none") else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "thpcow"


def cache_path(cpu_id: str, kernel: str, where: Path | None = None) -> Path | None:
    """The cache file of a CPU and kernel (None when the cache is off)."""
    where = where if where is not None else cache_dir()
    if where is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{cpu_id or 'unknown-cpu'}--{kernel or 'unknown-kernel'}")
    return where / f"{slug}.toml"


@dataclass
class Choice:
    """The profile a run uses, and why: ``how`` is file, preset, cpu-preset, cached, fitted or reference."""

    profile: CalibrationProfile
    how: str
    path: Path | None = None

    def line(self) -> str:
        """One line for a run's output: which profile and why (and how to calibrate)."""
        p = self.profile
        if self.how == "file":
            return f"profile: {p.name} (file {self.path})"
        if self.how == "cached":
            return f"profile: {p.name} (this machine's, cached {self.path})"
        if self.how == "fitted":
            return f"profile: {p.name} (this machine's, fitted now; not cached: the cache is off)"
        if self.how == "preset":
            return f"profile: preset {p.name}"
        if self.how == "cpu-preset":
            return (f"profile: preset {p.name} (matches this CPU {p.cpu_id}; run `thpcow calibrate` "
                    "to measure this machine)")
        return (f"profile: {p.name} (reference; no profile cached for this CPU and kernel: "
                "run `thpcow calibrate` to measure this machine)")


def select(cpu_id: str | None = None, kernel: str | None = None) -> Choice:
    """The profile for a run that names none: cached for this CPU + kernel, else a CPU preset, else the reference.

    The cached file is read with CalibrationProfile.load(); a cached file that
    does not load is ignored (the next calibration rewrites it).
    """
    cpu_id = host_cpu_id() if cpu_id is None else cpu_id
    kernel = host_kernel() if kernel is None else kernel
    path = cache_path(cpu_id, kernel)
    if path is not None and path.is_file():
        try:
            return Choice(CalibrationProfile.load(path), "cached", path)
        except (OSError, ValueError):
            pass
    for p in PRESETS.values():
        if cpu_id and p.cpu_id == cpu_id and p is not DEFAULT_PROFILE:
            return Choice(p, "cpu-preset")
    return Choice(DEFAULT_PROFILE, "reference")


def mismatch(profile: CalibrationProfile, cpu_id: str | None = None, kernel: str | None = None) -> str | None:
    """A warning when ``profile`` was measured on another CPU or kernel than this machine's, else None."""
    cpu_id = host_cpu_id() if cpu_id is None else cpu_id
    kernel = host_kernel() if kernel is None else kernel
    other = []
    if profile.cpu_id and cpu_id and profile.cpu_id != cpu_id:
        other.append(f"CPU {profile.cpu_id} (this one: {cpu_id})")
    if profile.kernel and kernel and profile.kernel != kernel:
        other.append(f"kernel {profile.kernel} (this one: {kernel})")
    if not other:
        return None
    return (f"the profile '{profile.name}' was measured on {' and '.join(other)}: its costs may differ "
            "(run `thpcow calibrate` here)")
