"""thpcow policies: the COW policies (kernel builds and userspace strategies), one each."""

from __future__ import annotations


def command() -> None:
    """List the COW policies: kernel builds and userspace strategies, with their parameters."""
    import shutil
    import textwrap

    from ..experiments.policies import policy_help

    width = max(60, min(shutil.get_terminal_size((80, 24)).columns, 120))
    indent = " " * 32
    print(f"{'POLICY':<20} {'KIND':<10} WHAT IT DOES")
    for name, (kind, text, params) in sorted(policy_help().items()):
        lines = textwrap.wrap(text, width - len(indent))
        if params:
            lines += textwrap.wrap("parameters: " + ", ".join(f"{k}={v}" for k, v in params.items()),
                                   width - len(indent))
        print(f"{name:<20} {kind:<10} {lines[0]}")
        for line in lines[1:]:
            print(indent + line)
