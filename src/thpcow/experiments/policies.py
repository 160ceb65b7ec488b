"""COW policies as experiments compare them: a kernel build, or a userspace strategy on upstream.

A policy name is either a kernel build (:data:`thpcow.kernel.builds.BUILDS`:
upstream, the series, pre-5.8, mTHP COW, directed khugepaged, reservation,
cow-density) or a userspace strategy (:data:`thpcow.strategies.STRATEGIES`:
MADV_COLLAPSE after fork, MADV_DONTFORK) run on the upstream kernel.
Parameters follow the name: ``"mthp-cow:order=6"``, ``"collapse-after-fork:who=both"``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..kernel.builds import ALIASES, BUILDS, parse_build, split_spec
from ..strategies import STRATEGIES, Strategy, parse_strategy



@dataclass
class Policy:
    """One compared policy: the kernel build to boot and the strategy userspace follows."""

    spec: str
    build: str                       # a kernel build spec, parsed again for every kernel booted
    strategy: Strategy | None = None

    @property
    def kind(self) -> str:
        return "userspace" if self.strategy is not None else "kernel"

    def __repr__(self) -> str:
        return self.spec


def policy_names() -> list[str]:
    return list(BUILDS) + list(STRATEGIES)


def policy_help() -> dict[str, tuple[str, str, dict]]:
    """name -> (kind, one line of help, parameters with defaults)."""
    out = {name: ("kernel", cls.help, dict(cls.params)) for name, cls in BUILDS.items()}
    out.update({name: ("userspace", cls.help, dict(cls.params)) for name, cls in STRATEGIES.items()})
    return out


def parse_policy(spec: "str | Policy") -> Policy:
    """A policy from ``"name"`` or ``"name:key=value,..."``; ValueError names what is wrong."""
    if isinstance(spec, Policy):
        return spec
    name, _ = split_spec(str(spec), "policy")
    if name in STRATEGIES:
        return Policy(str(spec), "upstream", parse_strategy(str(spec)))
    if name in BUILDS or name in ALIASES:
        parse_build(str(spec))                 # check the parameters now
        return Policy(str(spec), str(spec))
    raise ValueError(f"unknown COW policy {name!r}; known: {', '.join(sorted(policy_names()))}")
