"""Userspace strategies: what a program can do about THPs and fork on an unmodified kernel.

A strategy acts only through system calls on :class:`~thpcow.kernel.Process`
objects (``madvise``, ``process_madvise``, the VMA list), never on kernel
state, so that the same code can drive a real process.  A scenario runner
calls it at two points:

- ``before_fork(parent, child_needs)``: before the workload forks;
  ``child_needs`` lists the (addr, length) ranges the child will use;
- ``phase_end(parent, children)``: after a phase of writes.

Strategies are made by name from :data:`STRATEGIES`, with parameters as
``"name:key=value,key=value"``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from ..kernel.constants import MADV_COLLAPSE, MADV_DONTFORK, PAGE_SIZE, VM_NOHUGEPAGE
from ..kernel.builds import set_params
from ..kernel.errors import KernelError

if TYPE_CHECKING:
    from ..kernel import Process


class Strategy:
    """Base class: a userspace strategy that does nothing."""

    name: ClassVar[str] = "none"
    help: ClassVar[str] = ""
    params: ClassVar[dict[str, object]] = {}
    choices: ClassVar[dict[str, tuple]] = {}

    def __init__(self, **kwargs) -> None:
        set_params(self, f"strategy {self.name}", kwargs)
        for key in self.params:
            allowed = self.choices.get(key)
            if allowed and getattr(self, key) not in allowed:
                raise ValueError(f"strategy {self.name}: {key}={getattr(self, key)} must be "
                                 f"{', '.join(map(str, allowed[:-1]))} or {allowed[-1]}")

    def __repr__(self) -> str:
        args = ",".join(f"{k}={getattr(self, k)}" for k in self.params)
        return f"{self.name}:{args}" if args else self.name

    def before_fork(self, parent: Process, child_needs: list[tuple[int, int]]) -> None:
        """Before the workload forks; ``child_needs`` lists the (addr, length) the child uses."""

    def phase_end(self, parent: Process, children: list[Process]) -> None:
        """After a phase of writes."""


class CollapseAfterFork(Strategy):
    """MADV_COLLAPSE of the process's THP-eligible memory at the end of each phase."""

    name = "collapse-after-fork"
    help = "upstream COW, then MADV_COLLAPSE of the written ranges at the end of each phase"
    params = {"who": "parent"}
    choices = {"who": ("parent", "child", "both")}

    def phase_end(self, parent, children):
        procs = []
        if self.who in ("parent", "both"):
            procs.append(parent)
        if self.who in ("child", "both"):
            procs.extend(children)
        for p in procs:
            if not p.alive:
                continue
            for v in p.vmas():
                if v.flags & VM_NOHUGEPAGE or not v.anon_vma:
                    continue
                try:
                    p.madvise(v.start, v.end - v.start, MADV_COLLAPSE)
                except KernelError:
                    pass                      # EINVAL/ENOMEM/EAGAIN: keep what could be collapsed


class DontFork(Strategy):
    """MADV_DONTFORK on what the child does not need (as QEMU does for guest RAM)."""

    name = "dontfork"
    help = "upstream COW, and MADV_DONTFORK on the parent's memory that the child does not use"

    def before_fork(self, parent, child_needs):
        for v in parent.vmas():
            cursor = v.start
            for start, length in sorted(child_needs):
                lo, hi = max(start & ~(PAGE_SIZE - 1), v.start), min(start + length, v.end)
                if lo >= hi:
                    continue
                if lo > cursor:
                    parent.madvise(cursor, lo - cursor, MADV_DONTFORK)
                cursor = max(cursor, (hi + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
            if cursor < v.end:
                parent.madvise(cursor, v.end - cursor, MADV_DONTFORK)


STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (CollapseAfterFork, DontFork)}


def parse_strategy(spec: str) -> Strategy:
    """A strategy from ``"name"`` or ``"name:key=value,..."``."""
    from ..kernel.builds import split_spec
    name, kwargs = split_spec(spec, "strategy")
    cls = STRATEGIES.get(name)
    if cls is None:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc)) from None
