"""thpcow.machine: the machine model (TLBs, page walks, kernel-event latencies) that prices what the kernel does."""

from .tlb import (
    Metric, SimMetric, Tlb, TlbKnobs, TlbSimulator, WalkCache, page_shifts_of,
)
from .tlb_reference import ReferenceTlbSimulator
from .presets import PRESETS, PresetError, get_preset, load_preset, save_preset
from .sampling import SampledWalks, sample_windows

__all__ = [
    "Metric", "SimMetric", "Tlb", "TlbKnobs", "TlbSimulator", "WalkCache", "ReferenceTlbSimulator",
    "page_shifts_of", "PRESETS", "PresetError", "get_preset", "load_preset", "save_preset",
    "SampledWalks", "sample_windows",
]
