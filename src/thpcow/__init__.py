"""thpcow: a lab for Linux transparent huge pages and copy-on-write after fork()."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .experiments.runner import compare


def __getattr__(name: str):
    """thpcow.compare (the notebook API), imported on first use so that ``import thpcow.kernel``
    does not load the experiments."""
    if name == "compare":
        from .experiments.runner import compare

        globals()["compare"] = compare
        return compare
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "compare"})
