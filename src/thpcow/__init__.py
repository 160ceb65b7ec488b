"""thpcow: a lab for Linux transparent huge pages and copy-on-write after fork()."""

__version__ = "0.1.0"

from .experiments.runner import compare  # noqa: E402  (thpcow.compare: the notebook API)
