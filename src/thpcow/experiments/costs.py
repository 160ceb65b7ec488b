"""The latency model that prices one workload op for ``thpcow compare``.

:class:`MachineLatencyModel` adapts :func:`thpcow.machine.latency.cost_vmstat_delta`
(the op's vmstat deltas, with fork/exit page-table hints that vmstat does not
count) and adds the op's own work: 15 ns per access and 0.035 ns per byte
moved (calibration.md, random 8-byte accesses over 256 MiB; memset at about
28.6 GB/s).  Address translation is not in it: the runner reports that
separately (``tlb_ms``, from the TLB simulator).  khugepaged's work is not
charged to any op (it runs on its own thread); MADV_COLLAPSE from a policy's
``phase_end`` and cow-density's collapses are.
"""

from __future__ import annotations

from typing import Mapping

ACCESS_NS = 15.0        # one load or store: random 8 B access, 256 MiB buffer (calibration.md section 6)
BYTE_NS = 0.035         # per byte moved: memset / sequential read at ~28.6 GB/s (sections 4 and 6)


class MachineLatencyModel:
    """Adapter: :func:`thpcow.machine.latency.cost_vmstat_delta` on each op's deltas, plus its accesses and bytes."""

    def __init__(self, profile=None) -> None:
        from ..machine import latency

        self.profile = profile or latency.DEFAULT_PROFILE
        self._cost = latency.cost_vmstat_delta
        self.name = f"thpcow.machine.latency ({self.profile.name})"

    def op_cost_ns(self, kind: str, d: Mapping[str, int], accesses: int = 0, nbytes: int = 0,
                   pte_tables: int = 0, pmds: int = 0, ptes: int | None = None, dense: bool = False) -> float:
        """Modelled time of one op; fork and exit get the page-table hints vmstat does not count.

        ``ptes``: the present PTEs in those tables (None: every table full).  ``dense``: the op
        overwrites whole pages, so each of its COW faults is a dense one (``cow_dense_4k_ns``).
        """
        hints: dict[str, int] = {}
        if dense:
            hints["dense_cow_pages"] = int(d.get("sim_cow_pages", 0))
        if kind in ("fork", "exit"):
            hints = {f"{kind}_pmds": pmds, f"{kind}_pte_tables": pte_tables}
            if kind == "fork":
                hints["forks"] = 1
            if ptes is not None:
                hints[f"{kind}_ptes"] = ptes
        return accesses * ACCESS_NS + nbytes * BYTE_NS + self._cost(d, self.profile, hints).total_ns


def resolve_profile(spec: str | None, auto: bool = False):
    """(profile, [lab] section, Choice) for a ``--profile`` value.

    ``spec`` is a profile file (written by ``thpcow calibrate``), a cost preset
    name (:data:`thpcow.machine.cost_presets.PRESETS`), ``auto`` (the machine's
    cached profile, else this CPU's preset, else the reference:
    :func:`~thpcow.machine.cost_presets.select`), or None: the reference
    profile, or ``auto`` when ``auto`` is true.  The [lab] section is {} except
    for files.  A value that is neither raises ValueError naming the presets.
    """
    from pathlib import Path

    from ..lab.calibrate import load_profile
    from ..machine import cost_presets as cp
    from ..machine import latency

    if spec is None and not auto:
        return latency.DEFAULT_PROFILE, {}, cp.Choice(latency.DEFAULT_PROFILE, "reference")
    if spec is None or (spec == "auto" and not Path(spec).exists()):
        choice = cp.select()
        lab = load_profile(choice.path)[1] if choice.path is not None else {}
        return choice.profile, lab, choice
    if spec in cp.PRESETS and not Path(spec).exists():
        return cp.PRESETS[spec], {}, cp.Choice(cp.PRESETS[spec], "preset")
    if not Path(spec).exists():
        raise cp.ProfileChoiceError(f"--profile={spec}: no such profile file or preset "
                                    f"(presets: {', '.join(cp.PRESETS)}, or auto)")
    prof, lab = load_profile(spec)
    return prof, lab, cp.Choice(prof, "file", Path(spec))


def latency_model(profile: str | None = None) -> MachineLatencyModel:
    """The latency model compare prices ops with: the profile file or cost preset ``profile``
    (see :func:`resolve_profile`; ``auto`` selects the machine's), or the reference profile
    (measured on one machine, whatever the TLB preset)."""
    if profile is None:
        return MachineLatencyModel()
    return MachineLatencyModel(resolve_profile(profile)[0])


def host_cpu() -> str:
    """This machine's CPU (/proc/cpuinfo "model name"), or "unknown"."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def profile_warning(model: MachineLatencyModel) -> str | None:
    """A warning when the latency profile was measured on another CPU or kernel than this machine's."""
    from ..machine.cost_presets import host_cpu_id, mismatch

    prof = model.profile
    if prof.cpu_id and host_cpu_id():
        return mismatch(prof)
    cpu = host_cpu()
    if cpu == "unknown" or prof.cpu == cpu:
        return None
    return (f"the latency profile '{prof.name}' was measured on {prof.cpu}; this machine "
            f"is {cpu}: its costs may differ (run `thpcow calibrate` here and pass --profile FILE)")
