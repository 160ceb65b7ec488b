"""thpcow.kernel: a simulated Linux 6.18 memory-management subsystem (anonymous memory, THP, COW)."""

from . import constants as _constants
from .constants import *  # noqa: F401,F403
from .errors import InvariantViolation, KernelError, OutOfMemory, SegmentationFault
from .kernel import Kernel, Process

__all__ = ["Kernel", "Process", "KernelError", "SegmentationFault", "OutOfMemory", "InvariantViolation"] + [
    name for name in dir(_constants) if name.isupper()
]
