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

from .tlb import TlbKnobs


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
