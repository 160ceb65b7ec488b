"""Errors the simulated kernel returns: an errno and a message naming the argument.

A system call that fails raises :class:`KernelError` with the errno the real
kernel returns (``EINVAL``, ``ENOMEM``, ...) and leaves every piece of state as
it was.  A memory access the kernel would answer with SIGSEGV raises
:class:`SegmentationFault` naming the faulting address.  A bug in the
modelled kernel code (the 2026 series' v1 collapse) raises
:class:`KernelOops` with a report like the kernel's, and the kernel stays dead.
"""

from __future__ import annotations

import errno as _errno
import os
import sys


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


class KernelOops(Exception):
    """The simulated kernel oopsed: a bug in the kernel code being modelled, not a failed call.

    ``function``: where it faulted (the RIP); ``cause``: one line; ``stack``:
    the model functions that led there, innermost first (the Call Trace);
    ``report``: the text the kernel would log.  The kernel is dead
    afterwards: every later call raises a KernelOops that repeats the first.
    """

    def __init__(self, function: str, cause: str, stack: list[str], report: str) -> None:
        self.function = function
        self.cause = cause
        self.stack = stack
        self.report = report
        caller = f", called from {stack[0]}" if stack else ""
        super().__init__(f"Oops: {cause} in {function}{caller}")

    def summary(self) -> str:
        """One line for tables: where it faulted and the path that got there."""
        path = " < ".join([self.function] + self.stack[:3])
        return f"Oops in {path}"


# Model methods whose kernel function has another name.
_KERNEL_NAMES = {"do_scan": "khugepaged_do_scan", "wakeup": "khugepaged"}


def _model_stack(skip: set[str]) -> list[str]:
    """The kernel model functions on the Python stack, innermost first (private helpers left out).

    A system call ends the trace at its entry (``__x64_sys_*``); a kernel
    thread (khugepaged, woken by the simulated clock) at ``kthread``.
    """
    out: list[str] = []
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_name
        module = f.f_globals.get("__name__", "")
        if module in ("thpcow.kernel.kernel", "thpcow.kernel.clock"):
            if type(f.f_locals.get("self")).__name__ == "Process" and not name.startswith("_"):
                out.append(f"__x64_sys_{name}")
                break
            if module == "thpcow.kernel.clock":
                out.append("kthread")
                break
        elif module.startswith("thpcow.kernel") and module != __name__ and name not in skip \
                and not (name.startswith("_") and not name.startswith("__")) and not name.startswith("<"):
            out.append(_KERNEL_NAMES.get(name, name))
        f = f.f_back
    return out


def null_pmd_oops(k) -> KernelOops:
    """The oops of set_pmd_at() called with a NULL PMD pointer (vmf->pmd never set).

    With CONFIG_PAGE_TABLE_CHECK the check reads the old entry first and
    faults in __page_table_check_pmds_set() (KASAN: null-ptr-deref, as
    syzbot reported the series); without it the store itself faults, inlined
    into set_pmd_at()'s caller (as the kernel test robot reported it).
    Marks the kernel dead (``k.oops``) and returns the exception to raise.
    """
    function, *stack = _model_stack({"set_pmd_at"}) or ["set_pmd_at"]
    if k.ptc is not None:
        rip = "__page_table_check_pmds_set"
        stack = ["set_pmd_at", function] + stack
        head = ["Oops: general protection fault, probably for non-canonical address "
                "0xdffffc0000000000: 0000 [#1] SMP KASAN NOPTI",
                "KASAN: null-ptr-deref in range [0x0000000000000000-0x0000000000000007]"]
        cause = "general protection fault (KASAN: null-ptr-deref) reading the old PMD"
    else:
        rip = function
        head = ["BUG: kernel NULL pointer dereference, address: 0000000000000000",
                "#PF: supervisor write access in kernel mode",
                "#PF: error_code(0x0002) - not-present page",
                "Oops: Oops: 0002 [#1] SMP NOPTI"]
        cause = "kernel NULL pointer dereference writing the PMD (set_pmd_at)"
    comm = "khugepaged" if "kthread" in stack else "the calling process"
    report = "\n".join(head + [f"Comm: {comm}", f"RIP: 0010:{rip}", "Call Trace:", " <TASK>"]
                       + [f" {fn}" for fn in stack] + [" </TASK>"])
    exc = KernelOops(rip, cause, stack, report)
    k.oops = exc
    return exc
