"""ptrace(2) through ctypes, for the recorder: seize, event stops and one-syscall injection (x86-64).

The recorder needs a userfaultfd created by the traced process itself (userfaultfd(2) works on the
caller's mm).  :func:`inject_syscall` makes a stopped tracee run one system call whose arguments
are registers only: it points the instruction pointer at a ``syscall`` instruction found in the
tracee's vdso, single-steps it and restores every register, so that a system call the tracee was
interrupted in restarts as it would have (``orig_rax = -1`` during the injected call keeps the
kernel's restart logic out of it; the saved registers bring it back).  No memory of the tracee is
written.  The injected descriptor is then copied to the recorder with pidfd_getfd(2) (v5.6) and
closed in the tracee by a second injected call.

Errors are :class:`PtraceError` (OSError) with the call and the errno text.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

PTRACE_CONT = 7
PTRACE_SINGLESTEP = 9
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_DETACH = 17
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208

PTRACE_O_TRACEFORK = 0x02
PTRACE_O_TRACEVFORK = 0x04
PTRACE_O_TRACECLONE = 0x08
PTRACE_O_TRACEEXEC = 0x10
PTRACE_O_TRACEEXIT = 0x40

PTRACE_EVENT_FORK = 1
PTRACE_EVENT_VFORK = 2
PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_EXEC = 4
PTRACE_EVENT_EXIT = 6
PTRACE_EVENT_STOP = 128

WALL = 0x40000000                          # __WALL: wait for every kind of child (the auto-attached too)

SYS_close = 3
SYS_userfaultfd = 323
SYS_pidfd_open = 434
SYS_pidfd_getfd = 438

_REG_NAMES = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx",
              "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base",
              "ds", "es", "fs", "gs")


class UserRegs(ctypes.Structure):
    """struct user_regs_struct (x86-64)."""

    _fields_ = [(n, ctypes.c_ulonglong) for n in _REG_NAMES]


class PtraceError(OSError):
    """A ptrace request or an injected system call failed."""


_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p)
_libc.syscall.restype = ctypes.c_long


def supported() -> tuple[bool, str]:
    """Can this module inject system calls here?  (ok, reason)."""
    if platform.machine() != "x86_64":
        return False, f"syscall injection is implemented for x86-64 only (this is {platform.machine()})"
    return True, ""


def ptrace(request: int, pid: int, addr: int = 0, data: int | ctypes.c_void_p = 0) -> int:
    """One ptrace(2) request; PtraceError naming it on failure."""
    ctypes.set_errno(0)
    if isinstance(data, int):
        data = ctypes.c_void_p(data)
    r = _libc.ptrace(request, pid, ctypes.c_void_p(addr), data)
    if r == -1:
        e = ctypes.get_errno()
        if e:
            raise PtraceError(e, f"ptrace({request:#x}, pid {pid}): {os.strerror(e)}")
    return r


def syscall(nr: int, *args: int) -> int:
    """A raw system call in this process; PtraceError on failure."""
    r = _libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    if r == -1:
        e = ctypes.get_errno()
        raise PtraceError(e, f"syscall {nr}: {os.strerror(e)}")
    return r


def seize(pid: int, options: int) -> None:
    """PTRACE_SEIZE ``pid`` with ``options`` (the tracee keeps running)."""
    ptrace(PTRACE_SEIZE, pid, 0, options)


def interrupt(pid: int) -> None:
    """PTRACE_INTERRUPT: ask a seized tracee to stop (reported as PTRACE_EVENT_STOP)."""
    ptrace(PTRACE_INTERRUPT, pid)


def cont(pid: int, sig: int = 0) -> None:
    """PTRACE_CONT, delivering ``sig`` (0: none)."""
    ptrace(PTRACE_CONT, pid, 0, sig)


def listen(pid: int) -> None:
    """PTRACE_LISTEN: leave a group-stopped tracee stopped but let SIGCONT and events through."""
    ptrace(PTRACE_LISTEN, pid)


def detach(pid: int, sig: int = 0) -> None:
    """PTRACE_DETACH from a stopped tracee."""
    ptrace(PTRACE_DETACH, pid, 0, sig)


def event_msg(pid: int) -> int:
    """PTRACE_GETEVENTMSG: e.g. the new child's pid at a fork event."""
    msg = ctypes.c_ulong(0)
    ptrace(PTRACE_GETEVENTMSG, pid, 0, ctypes.addressof(msg))
    return msg.value


def get_regs(pid: int) -> UserRegs:
    """The tracee's registers."""
    regs = UserRegs()
    ptrace(PTRACE_GETREGS, pid, 0, ctypes.addressof(regs))
    return regs


def set_regs(pid: int, regs: UserRegs) -> None:
    """Set the tracee's registers."""
    ptrace(PTRACE_SETREGS, pid, 0, ctypes.addressof(regs))


def wait_stop(pid: int) -> int:
    """Wait for ``pid``'s next state change; its wait status.  Raises PtraceError if it exited."""
    while True:
        try:
            _, status = os.waitpid(pid, WALL)
        except InterruptedError:
            continue
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            raise PtraceError(errno.ESRCH, f"pid {pid} exited while being set up")
        return status


def find_syscall_insn(pid: int, root: str = "/") -> int:
    """The address of a ``syscall`` instruction (0f 05) in the tracee's vdso."""
    maps = os.path.join(root, "proc", str(pid), "maps")
    with open(maps) as f:
        for line in f:
            if line.rstrip().endswith("[vdso]"):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                break
        else:
            raise PtraceError(errno.ENOENT, f"{maps}: no [vdso] mapping to borrow a syscall instruction from")
    with open(os.path.join(root, "proc", str(pid), "mem"), "rb", buffering=0) as mem:
        mem.seek(lo)
        code = mem.read(hi - lo)
    i = code.find(b"\x0f\x05")
    if i < 0:
        raise PtraceError(errno.ENOENT, f"pid {pid}: no syscall instruction in its vdso")
    return lo + i


def step(pid: int) -> None:
    """Single-step the stopped tracee one instruction and wait for the trap.

    Needed before :func:`inject_syscall` at a stop inside a system call that still writes its
    return value afterwards (the exec event: execve's 0 would overwrite the injected number)."""
    ptrace(PTRACE_SINGLESTEP, pid)
    while True:
        status = wait_stop(pid)
        if os.WIFSTOPPED(status) and os.WSTOPSIG(status) == 5 and (status >> 16) == 0:
            return
        if os.WIFSTOPPED(status):
            ptrace(PTRACE_SINGLESTEP, pid, 0, 0 if os.WSTOPSIG(status) == 5 else os.WSTOPSIG(status))


def inject_syscall(pid: int, insn: int, nr: int, *args: int) -> int:
    """Make the stopped tracee ``pid`` run system call ``nr`` with register ``args``; its return
    value (a negative errno is raised as PtraceError).  Every register is restored afterwards."""
    saved = get_regs(pid)
    regs = UserRegs.from_buffer_copy(saved)
    regs.rax = nr
    regs.orig_rax = (1 << 64) - 1                    # not in a system call: no restart fix-up
    for name, val in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
        setattr(regs, name, val & ((1 << 64) - 1))
    regs.rip = insn
    set_regs(pid, regs)
    try:
        ptrace(PTRACE_SINGLESTEP, pid)
        while True:
            status = wait_stop(pid)
            if os.WIFSTOPPED(status) and os.WSTOPSIG(status) == 5 and (status >> 16) == 0:
                break                                 # the single-step trap
            if os.WIFSTOPPED(status):                 # another stop came first (a signal): step again
                ptrace(PTRACE_SINGLESTEP, pid)
        ret = ctypes.c_longlong(get_regs(pid).rax).value
    finally:
        set_regs(pid, saved)
    if -4096 < ret < 0:
        raise PtraceError(-ret, f"pid {pid}: injected syscall {nr}: {os.strerror(-ret)}")
    return ret


def steal_fd(pid: int, fd: int) -> int:
    """A copy of the tracee's descriptor ``fd`` in this process (pidfd_open + pidfd_getfd)."""
    pidfd = syscall(SYS_pidfd_open, pid, 0)
    try:
        return syscall(SYS_pidfd_getfd, pidfd, fd, 0)
    finally:
        os.close(pidfd)
