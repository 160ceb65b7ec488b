"""thpcow policies: the COW policies, one line each."""

from __future__ import annotations


def command() -> None:
    """List the COW policies, one line each."""
    from ..kernel.policy import REGISTRY

    for name, cls in sorted(REGISTRY.items()):
        print(f"{name:<20} {cls.help}")
