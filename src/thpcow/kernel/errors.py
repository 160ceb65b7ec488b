"""Errors the simulated kernel returns: an errno and a message naming the argument.

A system call that fails raises :class:`KernelError` with the errno the real
kernel returns (``EINVAL``, ``ENOMEM``, ...) and leaves every piece of state as
it was.  A memory access the kernel would answer with SIGSEGV raises
:class:`SegmentationFault` naming the faulting address.
"""

from __future__ import annotations

import errno as _errno
import os


class KernelError(OSError):
    """A failed system call: ``.errno`` is the kernel's errno, ``.call`` the call."""

    def __init__(self, err: int, call: str, detail: str) -> None:
        self.call = call
        self.detail = detail
        name = _errno.errorcode.get(err, str(err))
        super().__init__(err, f"{call}: {name} ({os.strerror(err)}): {detail}")

    def __str__(self) -> str:  # OSError's default adds "[Errno n]"; keep ours
        return self.args[1]


class SegmentationFault(KernelError):
    """SIGSEGV: an access to an unmapped address or a write to a read-only one."""

    def __init__(self, addr: int, detail: str) -> None:
        self.addr = addr
        super().__init__(_errno.EFAULT, "SIGSEGV", f"address {addr:#x}: {detail}")


class OutOfMemory(KernelError):
    """VM_FAULT_OOM: a fault could not allocate even one 4 KiB page."""

    def __init__(self, addr: int) -> None:
        self.addr = addr
        super().__init__(_errno.ENOMEM, "VM_FAULT_OOM", f"no memory for a page at {addr:#x}")


class InvariantViolation(AssertionError):
    """The page_table_check / DEBUG_VM style checker found an inconsistency."""


def einval(call: str, detail: str) -> KernelError:
    return KernelError(_errno.EINVAL, call, detail)


def enomem(call: str, detail: str) -> KernelError:
    return KernelError(_errno.ENOMEM, call, detail)


class HardwarePoison(KernelError):
    """SIGBUS (BUS_MCEERR_AR): an access to a page lost to memory failure."""

    def __init__(self, addr: int) -> None:
        self.addr = addr
        super().__init__(133, "SIGBUS", f"address {addr:#x}: the page was lost to a memory failure (EHWPOISON)")
