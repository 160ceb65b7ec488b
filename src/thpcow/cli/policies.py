"""thpcow policies: the COW policies (kernel builds and userspace strategies), one line each."""

from __future__ import annotations


def command() -> None:
    """List the COW policies, one line each."""
    from ..experiments.policies import policy_help

    for name, (kind, text, params) in sorted(policy_help().items()):
        args = ",".join(f"{k}={v}" for k, v in params.items())
        print(f"{name:<20} {kind:<9} {text}" + (f" [{args}]" if args else ""))
