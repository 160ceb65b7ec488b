"""thpcow.kernel: a simulated Linux 6.18 memory-management subsystem (anonymous memory, THP, COW)."""

import sys as _sys

from . import constants as _constants
from .constants import *  # noqa: F401,F403
from .errors import InvariantViolation, KernelError, KernelOops, OutOfMemory, SegmentationFault
from .kernel import Kernel, Process
from . import page_alloc as _page_alloc

# The former name of page_alloc (frames and the buddy allocator), for code that still imports it.
_sys.modules.setdefault(__name__ + ".physmem", _page_alloc)

__all__ = ["Kernel", "Process", "KernelError", "SegmentationFault", "OutOfMemory", "InvariantViolation", "KernelOops"] + [
    name for name in dir(_constants) if name.isupper() and not callable(getattr(_constants, name))
]
