"""COW policies: small objects behind the kernel's judgement points.

The fault code asks the kernel's policy object at the points where the
kernel (or a proposed patch) makes a decision.  :class:`Upstream` answers as
Linux 6.18 does: never copy a shared PMD-mapped THP whole, so
``do_huge_pmd_wp_page()`` splits the PMD and copies 4 KiB.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .kernel import Kernel
    from .mm import MM, VMA


class CowPolicy:
    """Base class: the judgement points a COW policy can answer."""

    name = "base"
    help = ""

    def huge_pmd_wp_copy(self, k: Kernel, mm: MM, vma: VMA, addr: int, slot: int, fid: int) -> int | None:
        """At a write fault on a shared PMD-mapped THP: return a VM_FAULT code to take over,
        or None to let upstream split the PMD and copy 4 KiB."""
        return None


class Upstream(CowPolicy):
    """Linux 6.18: split the PMD, copy 4 KiB (since v5.8)."""

    name = "upstream"
    help = "Linux 6.18: split the PMD and copy one 4 KiB page (since v5.8)"


REGISTRY: dict[str, type[CowPolicy]] = {Upstream.name: Upstream}


def get_policy(spec: "CowPolicy | str | None") -> CowPolicy:
    if spec is None:
        return Upstream()
    if isinstance(spec, CowPolicy):
        return spec
    try:
        return REGISTRY[spec]()
    except KeyError:
        raise ValueError(f"unknown COW policy {spec!r}; known: {', '.join(sorted(REGISTRY))}") from None
