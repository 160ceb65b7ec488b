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
                   pte_tables: int = 0, pmds: int = 0) -> float:
        """Modelled time of one op; fork and exit get the page-table hints vmstat does not count."""
        hints: dict[str, int] = {}
        if kind == "fork":
            hints = {"forks": 1, "fork_pmds": pmds, "fork_pte_tables": pte_tables}
        elif kind == "exit":
            hints = {"exit_pmds": pmds, "exit_pte_tables": pte_tables}
        return accesses * ACCESS_NS + nbytes * BYTE_NS + self._cost(d, self.profile, hints).total_ns


def latency_model(profile: str | None = None) -> MachineLatencyModel:
    """The latency model compare prices ops with: the profile file ``profile`` (written by
    ``thpcow calibrate``), or the reference profile (measured on one machine, whatever the TLB
    preset)."""
    if profile is None:
        return MachineLatencyModel()
    from ..lab.calibrate import load_profile
    return MachineLatencyModel(load_profile(profile)[0])


def host_cpu() -> str:
    """This machine's CPU (/proc/cpuinfo "model name"), or "unknown"."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def profile_warning(model: MachineLatencyModel) -> str | None:
    """A warning when the latency profile was measured on another kind of CPU than this one."""
    cpu = host_cpu()
    if cpu == "unknown" or model.profile.cpu == cpu:
        return None
    return (f"the latency profile '{model.profile.name}' was measured on {model.profile.cpu}; this machine "
            f"is {cpu}: its costs may differ (run `thpcow calibrate` here and pass --profile FILE)")
