"""thpcow workloads: the workloads and their parameters."""

from __future__ import annotations


def command() -> None:
    """List the workloads and their parameters (name: meaning (range); type, default)."""
    from ..workloads import REGISTRY

    for cls in REGISTRY.values():
        print(cls.describe())
