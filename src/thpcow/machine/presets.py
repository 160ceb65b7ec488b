"""Machine presets: the dTLB geometry of recent server cores, and TOML files with the same fields.

A preset is a :class:`~thpcow.machine.tlb.TlbKnobs`.  A TOML preset file is a
flat table whose keys are the knob names (every key optional, defaults as in
``TlbKnobs``)::

    name = "my-core"
    source = "where the numbers come from"
    l1_unified = true
    l1_4k_entries = 72
    l1_4k_assoc = 72
    l2_entries = 3072
    l2_assoc = 24

Geometry is cited per preset.  What the public documents do not give (the
PDE-cache geometry of Intel and Arm cores, the cost of a page-table read) is
marked ``assumption`` next to the value.  ``walk_ref_cycles`` is an
assumption everywhere: a page-table read that mostly hits the L2/L3 caches.
On this lab VM (nested paging) a walk reference is far dearer: the
8 GiB pointer chase of calibration.md section 6 (4 KiB 465 ns vs THP 311 ns)
suggests roughly 90 ns per guest page-table reference.
"""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path

from .tlb import ReadTiming, TlbKnobs


class PresetError(ValueError):
    """A preset name or preset file that cannot be used; the message names the file and field."""


PRESETS: dict[str, TlbKnobs] = {
    # AMD Zen 4 (EPYC 9004 "Genoa"), the core of the lab VM (calibration.md section 0).
    # Source: AMD, "Software Optimization Guide for the AMD Zen4 Microarchitecture",
    # publication 57647, section on the translation lookaside buffers: L1 DTLB 72 entries,
    # fully associative, 4 KiB / 16 KiB / 2 MiB / 1 GiB; unified L2 DTLB 3072 entries,
    # 24-way, 4 KiB / 16 KiB / 2 MiB and page-directory entries; a 64-entry page-directory
    # cache; six page walkers.  L2 DTLB hit: 7 extra cycles (Chips and Cheese, "AMD's Zen 4
    # Part 2: Memory Subsystem and Conclusion", 2022).  cpu_ghz: the 2.6 GHz this guest reports.
    # Simplification: the 64-entry page-directory cache is modelled fully associative.
    "amd-zen4-genoa": TlbKnobs(
        name="amd-zen4-genoa",
        source="AMD pub. 57647 (Zen 4 Software Optimization Guide), TLB section; "
               "Chips and Cheese, AMD's Zen 4 Part 2 (L2 TLB latency)",
        l1_unified=True, l1_4k_entries=72, l1_4k_assoc=72,
        l2_entries=3072, l2_assoc=24, l2_holds_2m=True,
        pwc_entries=64, pwc_assoc=64,
        cpu_ghz=2.6, l2_hit_cycles=7.0, walk_ref_cycles=40.0,
    ),
    # Intel Xeon 4th gen "Sapphire Rapids" (Golden Cove P-core).
    # Source: Intel 64 and IA-32 Architectures Optimization Reference Manual (248966),
    # Golden Cove TLB parameters: DTLB for loads 4 KiB 96 entries 6-way, 2 MiB/4 MiB 32
    # entries 4-way; STLB 2048 entries 16-way shared by 4 KiB and 2 MiB/4 MiB pages.  The
    # 96-entry DTLB, the 2048-entry STLB and its +7-cycle hit are also Chips and Cheese's
    # Golden Cove / Sapphire Rapids measurements (SPR "inherits the same TLB architecture").
    # The ways are the manual's; only the entry counts were cross-checked.  The store DTLB
    # (16 entries, all sizes) is not modelled: loads and stores share the load DTLB here.
    # PDE cache: Intel does not publish the paging-structure cache sizes (assumption: 32
    # entries, 4-way).  cpu_ghz: assumption, a typical all-core turbo.
    "intel-spr-goldencove": TlbKnobs(
        name="intel-spr-goldencove",
        source="Intel Optimization Reference Manual 248966, Golden Cove TLB parameters; "
               "Chips and Cheese Golden Cove / Sapphire Rapids TLB measurements",
        l1_unified=False, l1_4k_entries=96, l1_4k_assoc=6, l1_2m_entries=32, l1_2m_assoc=4,
        l2_entries=2048, l2_assoc=16, l2_holds_2m=True,
        pwc_entries=32, pwc_assoc=4,                       # assumption (not published)
        cpu_ghz=3.0, l2_hit_cycles=7.0, walk_ref_cycles=40.0,
    ),
    # Arm Neoverse V2 (NVIDIA Grace, AWS Graviton4).
    # Source: Arm Neoverse V2 Core Technical Reference Manual (102375), MMU chapter:
    # L1 data TLB 48 entries, fully associative, all translation granule / block sizes;
    # unified L2 TLB 2048 entries, 8-way; an L2 TLB hit costs 5 extra cycles.  Grace's 2.6 GHz
    # clock: Chips and Cheese, "Hot Chips 2023: Arm's Neoverse V2" (2023).  Walk cache geometry
    # is not given in the public summary (assumption: 64 entries, 4-way).
    "arm-neoverse-v2": TlbKnobs(
        name="arm-neoverse-v2",
        source="Arm Neoverse V2 Core TRM 102375, MMU/TLB organisation; "
               "Chips and Cheese, Hot Chips 2023: Arm's Neoverse V2",
        l1_unified=True, l1_4k_entries=48, l1_4k_assoc=48,
        l2_entries=2048, l2_assoc=8, l2_holds_2m=True,
        pwc_entries=64, pwc_assoc=4,                       # assumption (not published)
        cpu_ghz=2.6, l2_hit_cycles=5.0, walk_ref_cycles=40.0,
    ),
}

_FIELD_TYPES = {f.name: f.type for f in fields(TlbKnobs)}
_PYTHON_TYPES = {"str": (str,), "bool": (bool,), "int": (int,), "float": (int, float)}


def get_preset(name: str) -> TlbKnobs:
    """A copy of a built-in preset by name."""
    try:
        knobs = PRESETS[name]
    except KeyError:
        raise PresetError(f"preset {name!r}: unknown; built-in presets are {', '.join(sorted(PRESETS))}") \
            from None
    return TlbKnobs(**knobs.to_dict())


def load_preset(path: str | Path) -> TlbKnobs:
    """Read a TOML preset file into knobs; a bad file raises PresetError naming the file and the field.

    Errors: a TOML syntax error (with tomllib's line and column), a key that
    is not a knob, a value of the wrong type, or a value the knobs reject
    (for example an associativity that does not divide the entries).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise PresetError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PresetError(f"{path}: not valid TOML: {e}") from None
    for key, val in data.items():
        if key not in _FIELD_TYPES:
            raise PresetError(f"{path}: field '{key}': not a TLB knob (known: {', '.join(_FIELD_TYPES)})")
        want = _FIELD_TYPES[key]
        ok = isinstance(val, _PYTHON_TYPES[want]) and (want == "bool" or not isinstance(val, bool))
        if not ok:
            raise PresetError(f"{path}: field '{key}': expected {want}, got {type(val).__name__} {val!r}")
    data.setdefault("name", path.stem)
    knobs = TlbKnobs(**data)
    try:
        return knobs.validate()
    except ValueError as e:
        raise PresetError(f"{path}: {e}") from None


def save_preset(knobs: TlbKnobs, path: str | Path) -> Path:
    """Write knobs as a TOML preset file that :func:`load_preset` reads back unchanged."""
    path = Path(path)
    lines = []
    for key, val in knobs.to_dict().items():
        if isinstance(val, bool):
            lines.append(f"{key} = {'true' if val else 'false'}")
        elif isinstance(val, str):
            escaped = val.replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'{key} = "{escaped}"')
        elif isinstance(val, float):
            lines.append(f"{key} = {val!r}")
        else:
            lines.append(f"{key} = {val}")
    path.write_text("\n".join(lines) + "\n")
    return path


# -- read timing: fitted per machine (machine/tlb.py read_ns) --------------------------------------
# A separate block from the TLB geometry above: the fitted free parameters of
# the read-timing model, per machine, and the sweep each was fitted to.

_EMR_SOURCE = ("fitted to the read sweep of lab/tlbmeasure.py (thread CPU time, median of 5) on a "
               "2-vCPU KVM guest, Intel Xeon family 6 model 207 (Emerald Rapids), Linux 6.18.44, "
               "2026-12-05; fit set: sizes 4, 16, 64, 256, 1024, 4096 MiB")

READ_TIMINGS: dict[str, ReadTiming] = {
    "intel-emr-kvm": ReadTiming(
        name="intel-emr-kvm", tlb_preset="intel-spr-goldencove",
        source=_EMR_SOURCE,
        llc_ns=34.5842, dram_ns=118.7917, llc_mib=13.3431, cache_slope=1.1814, walk_hit_ns=10.9979,
        walk_miss_ns=77.2732, pt_cache_mib=1.5278, mlp=19.8897, walk_mlp=8.5144, gather_ns=1.2835,
        seq_cache_ns=0.288, seq_dram_ns=0.5782, seq_llc_mib=20.7268,
    ),
}

# The machines each fitted timing is for: (cpuinfo vendor_id, cpu family, model) -> READ_TIMINGS key.
# Sapphire Rapids (143) and Emerald Rapids (207) share the Golden Cove / Raptor Cove dTLBs.
READ_TIMING_CPUS: dict[tuple[str, str, str], str] = {
    ("GenuineIntel", "6", "207"): "intel-emr-kvm",
    ("GenuineIntel", "6", "143"): "intel-emr-kvm",
}

# The sweep READ_TIMINGS["intel-emr-kvm"] was fitted to: ns per 8-byte read, {(pattern, backing):
# {size MiB: median}}.  Fit set: the sizes 4, 16, 64, 256, 1024, 4096; the others check the fit.
READ_SWEEPS: dict[str, dict[tuple[str, str], dict[int, float]]] = {
    "intel-emr-kvm": {
        ("gather", "4k"): {4: 3.127, 8: 3.868, 16: 4.868, 32: 5.379, 64: 6.664, 128: 8.329, 256: 11.727,
                           512: 12.113, 1024: 13.119, 2048: 15.484, 4096: 16.25},
        ("chase", "4k"): {4: 34.083, 8: 36.422, 16: 54.612, 32: 117.319, 64: 126.793, 128: 123.999,
                          256: 137.812, 512: 139.832, 1024: 145.607, 2048: 192.64, 4096: 202.157},
        ("seq", "4k"): {4: 0.282, 8: 0.274, 16: 0.287, 32: 0.255, 64: 0.596, 128: 0.563, 256: 0.609,
                        512: 0.619, 1024: 0.598, 2048: 0.608, 4096: 0.6},
        ("gather", "thp"): {4: 3.135, 8: 3.424, 16: 3.695, 32: 3.22, 64: 6.31, 128: 5.929, 256: 7.133,
                            512: 7.163, 1024: 7.147, 2048: 7.943, 4096: 8.705},
        ("chase", "thp"): {4: 32.884, 8: 32.383, 16: 65.665, 32: 52.701, 64: 114.432, 128: 110.567,
                           256: 111.589, 512: 109.941, 1024: 109.789, 2048: 113.703, 4096: 119.019},
        ("seq", "thp"): {4: 0.307, 8: 0.274, 16: 0.281, 32: 0.245, 64: 0.606, 128: 0.594, 256: 0.588,
                         512: 0.595, 1024: 0.6, 2048: 0.596, 4096: 0.673},
        ("gather", "split"): {4: 3.489, 8: 3.544, 16: 4.284, 32: 4.611, 64: 6.754, 128: 8.611, 256: 9.592,
                              512: 11.516, 1024: 12.866, 2048: 14.527, 4096: 16.8},
        ("chase", "split"): {4: 40.321, 8: 35.708, 16: 47.269, 32: 122.049, 64: 123.27, 128: 132.816,
                             256: 130.371, 512: 134.981, 1024: 143.842, 2048: 158.473, 4096: 248.309},
        ("seq", "split"): {4: 0.302, 8: 0.279, 16: 0.279, 32: 0.361, 64: 0.334, 128: 0.613, 256: 0.618,
                           512: 0.593, 1024: 0.592, 2048: 0.6, 4096: 0.676},
    },
}


def get_read_timing(name: str) -> ReadTiming:
    """A copy of a fitted read timing by name."""
    try:
        t = READ_TIMINGS[name]
    except KeyError:
        raise PresetError(f"read timing {name!r}: unknown; fitted timings are {', '.join(sorted(READ_TIMINGS))}") \
            from None
    return ReadTiming(**t.to_dict())


def read_timing_for_cpu(vendor: str, family: str, model: str) -> ReadTiming | None:
    """The fitted read timing of a CPU (cpuinfo's vendor_id, cpu family, model), or None."""
    name = READ_TIMING_CPUS.get((vendor.strip(), str(family).strip(), str(model).strip()))
    return get_read_timing(name) if name else None


def sweep_cases(name: str) -> list[dict]:
    """READ_SWEEPS[name] as case dicts (pattern, backing, size_mib, ns), sizes in order."""
    return [{"pattern": p, "backing": b, "size_mib": s, "ns": ns}
            for (p, b), row in READ_SWEEPS[name].items() for s, ns in sorted(row.items())]
