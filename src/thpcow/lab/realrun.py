"""A scenario on the running kernel: the workload's op stream replayed by real processes.

The same op stream the simulator runs (:mod:`thpcow.workloads.ops`, the scenario's workload and
seed) drives real processes.  Each workload pid is an *agent* (:mod:`thpcow.lab._agent`): SPAWN
starts one (a fresh interpreter), FORK makes the agent fork itself and the child serves the new
pid, EXIT ends it.  MMAP maps anonymous memory whose start is PMD-aligned, MADVISE calls madvise,
WRITE / READ store / load one byte at each offset (NumPy).  Ops run one after the other as fast as
they go: the op's time ``t`` only decides when THP samples are taken, it does not pace the run.
A userspace strategy (MADV_COLLAPSE after fork, MADV_DONTFORK) runs through the same hooks as on
the simulator (``before_fork``, ``phase_end``) on a stand-in for each process whose madvise goes to
the agent.  Kernel builds other than the running kernel's own cannot run here: they need a kernel
change.

Figures (one :class:`RealResult` per policy):

- counters (thp_fault_alloc, thp_split_pmd, thp_collapse_alloc, ...): /proc/vmstat deltas from just
  before the first fork to the end (the window the simulator's summary uses), and over the whole
  run.  /proc/vmstat is system-wide: the run is repeated until its quietest THP score comes up
  twice (:func:`thpcow.lab.scenario.settled`, at most ``max_runs``) and the quietest run is kept;
  ``settled`` says whether that happened.  Where a cgroup v2 hierarchy offers the memory
  controller to its children and can be written, a cgroup of the run's own is made and its
  memory.stat gives thp_fault_alloc and thp_collapse_alloc of the agents alone (``source``);
- ``pgfault``: the agents' own minor faults during their ops (getrusage around each op), not
  system-wide;
- ``cow_mib``: pages copied by COW, from pagemap: the PFNs of every region are read in both
  processes right after a fork, then before every exit, phase end (before the strategy's
  ``phase_end``, then read again after it: its collapses are not COW) and at the end; a present
  page whose PFN changed was copied.  A process stops being followed when no process it shares
  pages with (its parent or children) is alive;
- AnonHugePages of each live agent (smaps_rollup) and the present pages of its workload regions
  (pagemap; not its interpreter's memory) at every sample time of the op stream;
  ``peak_anon_huge_mib`` the most, summed over the agents, at one sample;
- per-op wall time (the agent's perf_counter_ns around the system call or the stores):
  ``lat_p50_us``/``lat_p99_us`` of the write ops of the workload's measured phase, ``op_ms`` the
  sum over all ops, ``wall_s`` the whole run (agents' start and IPC included).

Nothing writes sysfs.  Free memory is checked before each mmap and fork.  Agents are ended when the
run ends, fails or is interrupted; the first agent dies with the runner (PR_SET_PDEATHSIG) and the
others exit at EOF on their socket.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import procfs
from ._agent import recv_msg, send_msg

MIB = 1 << 20
PAGE_SIZE = procfs.PAGE_SIZE

# The /proc/vmstat counters a real run reports (deltas).
REAL_COUNTERS = ("thp_fault_alloc", "thp_fault_fallback", "thp_split_pmd", "thp_split_page",
                 "thp_deferred_split_page", "thp_collapse_alloc", "pgfault", "pgreuse")
# memory.stat (cgroup v2) names of the same events, where a memory cgroup counts them.
CGROUP_COUNTERS = ("thp_fault_alloc", "thp_collapse_alloc", "pgfault")

NEEDS_KERNEL_CHANGE = "needs a kernel change"
UPSTREAM_NAMES = ("upstream", "6.18")
AGENT_MARK = "thpcow.lab._agent"
MEM_MARGIN = 256 * MIB            # MemAvailable kept free beyond what an mmap or fork may need

ProgressFn = Callable[[int, int], None]


class RealRunError(Exception):
    """A real run could not be made; the message is one line naming why."""


def real_support(policy: str) -> str:
    """"" if ``policy`` can run on this kernel (the running kernel's own behaviour or a userspace
    strategy), else why not (:data:`NEEDS_KERNEL_CHANGE`)."""
    from ..experiments.policies import parse_policy
    from ..kernel.builds import split_spec

    pol = parse_policy(policy)
    if pol.strategy is not None:
        return ""
    name, kwargs = split_spec(pol.build)
    return "" if name in UPSTREAM_NAMES and not kwargs else NEEDS_KERNEL_CHANGE


def mem_available(root: str = "/") -> int:
    """MemAvailable from /proc/meminfo, in bytes."""
    path = os.path.join(root, "proc", "meminfo")
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError as exc:
        raise RealRunError(f"{path}: {exc.strerror}") from None
    raise RealRunError(f"{path}: no MemAvailable line")


def check_memory(need: int, what: str, root: str = "/") -> None:
    """RealRunError (one line) unless MemAvailable covers ``need`` bytes plus a margin."""
    avail = mem_available(root)
    if need + MEM_MARGIN > avail:
        raise RealRunError(f"not enough free memory for the real run: {what} needs {need // MIB} MiB "
                           f"(+{MEM_MARGIN // MIB} MiB kept free), MemAvailable is {avail // MIB} MiB; "
                           "use a smaller scenario")


# ---------------------------------------------------------------------------------------------
# cgroup v2: the run's own memory cgroup, where one can be made
# ---------------------------------------------------------------------------------------------

def cgroup2_root(root: str = "/") -> str | None:
    """The mount point of a cgroup v2 hierarchy whose root offers the memory controller and can
    be written, else None."""
    try:
        with open(os.path.join(root, "proc", "self", "mountinfo")) as f:
            mounts = [line.split() for line in f]
    except OSError:
        return None
    for m in mounts:
        try:
            fstype = m[m.index("-") + 1]
        except (ValueError, IndexError):
            continue
        if fstype != "cgroup2":
            continue
        path = os.path.join(root, m[4].lstrip("/"))
        try:
            with open(os.path.join(path, "cgroup.controllers")) as f:
                if "memory" not in f.read().split():
                    continue
        except OSError:
            continue
        if os.access(path, os.W_OK):
            return path
    return None


def parse_memory_stat(text: str) -> dict[str, int]:
    """memory.stat ("name value" lines) as a dict."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


class _Cgroup:
    """A memory cgroup of the run's own under a cgroup v2 root (removed at close)."""

    def __init__(self, base: str) -> None:
        with open(os.path.join(base, "cgroup.subtree_control")) as f:
            on = f.read().split()
        if "memory" not in on:                 # enabling it would change the machine's cgroups: not done
            raise OSError(f"{base}: the memory controller is not enabled for its children")
        self.path = os.path.join(base, f"thpcow-real-{os.getpid()}")
        os.mkdir(self.path)

    def add(self, pid: int) -> None:
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(pid))

    def stat(self) -> dict[str, int]:
        with open(os.path.join(self.path, "memory.stat")) as f:
            return parse_memory_stat(f.read())

    def close(self) -> None:
        for _ in range(50):
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.02)               # the last agent's exit is still being accounted


def open_cgroup(root: str = "/") -> "_Cgroup | None":
    base = cgroup2_root(root)
    if base is None:
        return None
    try:
        return _Cgroup(base)
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# agents
# ---------------------------------------------------------------------------------------------

class _AgentHandle:
    """The runner's end of one agent."""

    def __init__(self, pid: int, sock: socket.socket, popen: subprocess.Popen | None) -> None:
        self.pid = pid
        self.sock = sock
        self.popen = popen
        self.regions: dict[int, tuple[int, int]] = {}     # region id -> (addr, length) it can use

    def call(self, *msg, fds: tuple[int, ...] = ()) -> tuple[int, int, Any]:
        """Send one request; (wall_ns, minflt, value), or RealRunError naming what failed."""
        try:
            send_msg(self.sock, msg, fds)
            (err, wall, flt, value), _ = recv_msg(self.sock)
        except (EOFError, OSError) as exc:
            raise RealRunError(f"agent {self.pid} went away during {msg[0]} ({type(exc).__name__})") from None
        if err:
            raise RealRunError(f"agent {self.pid}: {err}")
        return wall, flt, value


def _package_path() -> str:
    import thpcow
    return os.path.dirname(os.path.dirname(os.path.abspath(thpcow.__file__)))


def start_agent() -> _AgentHandle:
    """A fresh agent process on one end of a socketpair."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (_package_path(), env.get("PYTHONPATH"))))
    try:
        popen = subprocess.Popen(
            [sys.executable, "-c", f"import sys; from {AGENT_MARK} import main; main(int(sys.argv[1]))",
             str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL, close_fds=True)
    finally:
        theirs.close()
    return _AgentHandle(popen.pid, ours, popen)


def is_agent(pid: int) -> bool:
    """Is ``pid`` an agent process (its command line names the agent module) that has not exited?"""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return AGENT_MARK.encode() in cmd and state not in ("Z", "X")


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    """Wait until ``pid`` has exited (gone or a zombie: its memory is torn down)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not is_agent(pid):
            return True
        time.sleep(0.001)
    return not is_agent(pid)


# ---------------------------------------------------------------------------------------------
# stand-ins for the strategies (the same hooks as on the simulator)
# ---------------------------------------------------------------------------------------------

@dataclass
class _Vma:
    start: int
    end: int
    flags: int = 0
    anon_vma: bool = True


class RealProcess:
    """What a userspace strategy sees of a real agent: its workload regions and madvise."""

    def __init__(self, agent: _AgentHandle, alive: Callable[[], bool], on_madvise=None) -> None:
        self.agent = agent
        self._alive = alive
        self.on_madvise = on_madvise

    @property
    def alive(self) -> bool:
        return self._alive()

    def vmas(self) -> list[_Vma]:
        return [_Vma(a, a + n) for a, n in sorted(self.agent.regions.values())]

    def madvise(self, addr: int, length: int, advice: int) -> None:
        from ..kernel.errors import KernelError

        wall, _flt, err = self.agent.call("madvise", addr, length, advice)
        if self.on_madvise is not None:
            self.on_madvise(self.agent.pid, wall)
        if err:
            raise KernelError(err, "madvise", f"{addr:#x}+{length} advice {advice} (real)")


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------

@dataclass
class RealResult:
    """One policy run on the running kernel (see the module docstring for the figures)."""

    policy: str
    summary: dict[str, Any]
    ops: dict[str, list] = field(default_factory=dict)
    samples: dict[str, list] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    runs: int = 1
    scores: list[tuple[int, int]] = field(default_factory=list)
    settled: bool = True
    source: str = "/proc/vmstat"
    agent_pids: list[int] = field(default_factory=list)   # every agent process of every run
    paced: bool = False


def _pfns(pid: int, addr: int, length: int) -> np.ndarray:
    return procfs.pagemap_pfn(procfs.read_pagemap(pid, addr, length // PAGE_SIZE))


def _rollup(pid: int) -> tuple[int, int]:
    """(Anonymous, AnonHugePages) kB of a live agent; zeros once it has gone."""
    try:
        r = procfs.read_smaps_rollup(pid)
    except procfs.LabError:
        return 0, 0
    return r.get("Anonymous", 0), r.get("AnonHugePages", 0)


def _workload_anon_kb(pid: int, regions) -> int:
    """kB of an agent's workload regions that are present (pagemap), what the simulator's
    process counts as its anonymous memory: the agent's interpreter (~26 MiB each, shared by its
    forked children) is left out.  0 once the agent has gone."""
    pages = 0
    try:
        for addr, length in regions:
            e = procfs.read_pagemap(pid, addr, length // PAGE_SIZE)
            pages += int(np.count_nonzero(e & np.uint64(procfs.PM_PRESENT)))
    except (procfs.LabError, OSError):
        return 0
    return pages * (PAGE_SIZE >> 10)


class _Once:
    """One real run of one policy."""

    def __init__(self, scenario, policy: str, cgroup: "_Cgroup | None", paced: bool = False) -> None:
        from ..experiments.policies import parse_policy

        self.sc = scenario
        self.workload = scenario.make_workload()
        self.pol = parse_policy(policy)
        self.cg = cgroup
        self.agents: dict[int, _AgentHandle] = {}     # workload pid -> live agent
        self.children: dict[int, list[int]] = {}
        self.all_pids: list[int] = []                 # every OS pid started, for the cleanup
        self.ref: dict[int, dict[int, np.ndarray]] = {}   # followed pid -> region -> PFNs at the reference
        self.links: dict[int, set[int]] = {}
        self.cow_pages = 0
        self.rows: dict[str, list] = {c: [] for c in ("seq", "t_ns", "kind", "pid", "phase", "n", "wall_ns",
                                                      "minflt", "since_fork")}
        self.samples: dict[str, list] = {c: [] for c in ("t_ns", "pid", "anon_kb", "anon_huge_kb")}
        self.sample_sums: list[int] = []
        self.duration = max(int(self.workload.duration_ns()), 1)
        step = scenario.sample_ms * 1e6 if scenario.sample_ms else self.duration / 200
        self.interval = max(int(step), 1000)
        self.next_sample = 0
        self.vm_fork: dict[str, int] | None = None
        self.cg_fork: dict[str, int] | None = None
        self.strategy_ns = 0
        self.killed: list[int] = []
        self.paced = paced                            # wait for each op's time (from the first op)

    # -- COW from pagemap -----------------------------------------------------------------------
    def follow(self, pid: int) -> None:
        a = self.agents[pid]
        self.ref[pid] = {r: _pfns(a.pid, addr, n) for r, (addr, n) in a.regions.items()}

    def checkpoint(self, rebase: bool = False) -> None:
        """Count the pages whose PFN changed since the reference in every followed process (none
        counted with ``rebase``); the reference becomes now."""
        for pid, regions in self.ref.items():
            a = self.agents.get(pid)
            if a is None:
                continue
            for r, old in regions.items():
                if r not in a.regions:
                    continue
                addr, n = a.regions[r]
                new = _pfns(a.pid, addr, n)
                if not rebase:
                    m = min(len(old), len(new))
                    both = (old[:m] != 0) & (new[:m] != 0)
                    self.cow_pages += int(np.count_nonzero(both & (old[:m] != new[:m])))
                regions[r] = new

    def unfollow_exited(self, pid: int) -> None:
        self.ref.pop(pid, None)
        for other in self.links.pop(pid, set()):
            peers = self.links.get(other)
            if peers is not None:
                peers.discard(pid)
                if not peers:
                    self.links.pop(other, None)
                    self.ref.pop(other, None)

    # -- samples --------------------------------------------------------------------------------
    def sample(self, t: int) -> None:
        total = 0
        for pid, a in self.agents.items():
            _all, huge = _rollup(a.pid)
            anon = _workload_anon_kb(a.pid, list(a.regions.values()))
            s = self.samples
            s["t_ns"].append(t)
            s["pid"].append(pid)
            s["anon_kb"].append(anon)
            s["anon_huge_kb"].append(huge)
            total += huge
        self.sample_sums.append(total)

    def advance_to(self, t: int) -> None:
        while self.next_sample <= t:
            self.sample(self.next_sample)
            self.next_sample += self.interval

    # -- ops ------------------------------------------------------------------------------------
    def proc(self, pid: int) -> RealProcess:
        return RealProcess(self.agents[pid], lambda: pid in self.agents, self._strategy_time)

    def _strategy_time(self, _pid: int, wall: int) -> None:
        self.strategy_ns += wall

    def apply(self, op) -> tuple[int, int]:
        """Do one op; (wall_ns, minflt) of it."""
        from ..workloads import ops as O

        kind = op.kind
        if kind == O.SPAWN:
            check_memory(64 * MIB, f"workload pid {op.pid}'s process")
            a = start_agent()
            self.all_pids.append(a.pid)
            if self.cg is not None:
                self.cg.add(a.pid)
            self.agents[op.pid] = a
            return 0, 0
        if kind == O.END:
            return 0, 0
        a = self.agents.get(op.pid)
        if a is None:
            raise RealRunError(f"op at t={op.t}: {kind} by pid {op.pid}, which is not alive")
        if kind == O.MMAP:
            check_memory(op.length, f"mmap of {op.length // MIB} MiB")
            wall, flt, addr = a.call("mmap", op.length)
            a.regions[op.region] = (addr, op.length)
            return wall, flt
        if kind == O.MUNMAP:
            addr, _n = a.regions[op.region]
            wall, flt, _ = a.call("munmap", addr + op.offset, op.length)
            if op.offset == 0 and op.length >= _n:
                a.regions.pop(op.region, None)
            return wall, flt
        if kind == O.MADVISE:
            addr, _n = a.regions[op.region]
            wall, flt, err = a.call("madvise", addr + op.offset, op.length, op.arg)
            if err:
                raise RealRunError(f"madvise(advice {op.arg}) by pid {op.pid}: {os.strerror(err)}")
            return wall, flt
        if kind in (O.WRITE, O.READ):
            addr, _n = a.regions[op.region]
            offs = np.ascontiguousarray(op.offsets, dtype=np.int64)
            if kind == O.WRITE:
                wall, flt, _ = a.call("write", addr, offs, op.token)
            else:
                wall, flt, _ = a.call("read", addr, offs)
            return wall, flt
        if kind == O.FORK:
            rss = sum(n for _a, n in a.regions.values())
            check_memory(rss, f"fork of pid {op.pid} ({rss // MIB} MiB mapped)")
            if self.pol.strategy is not None:
                needs = [(a.regions[r][0] + off, length) for r, off, length in op.needs]
                self.pol.strategy.before_fork(self.proc(op.pid), needs)
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                wall, flt, child = a.call("fork", fds=(theirs.fileno(),))
            finally:
                theirs.close()
            c = _AgentHandle(child, ours, None)
            c.regions = dict(a.regions)
            self.all_pids.append(child)
            self.agents[op.arg] = c
            self.children.setdefault(op.pid, []).append(op.arg)
            if op.pid in self.ref:
                self.checkpoint()
            self.follow(op.pid)
            self.follow(op.arg)
            self.links.setdefault(op.pid, set()).add(op.arg)
            self.links.setdefault(op.arg, set()).add(op.pid)
            return wall, flt
        if kind == O.EXIT:
            self.checkpoint()
            t0 = time.perf_counter_ns()
            a.call("exit")
            if a.popen is not None:
                a.popen.wait(timeout=10)
            elif not wait_gone(a.pid):
                raise RealRunError(f"agent {a.pid} (pid {op.pid}) did not exit")
            wall = time.perf_counter_ns() - t0
            a.sock.close()
            del self.agents[op.pid]
            self.unfollow_exited(op.pid)
            return wall, 0
        if kind == O.PHASE_END:
            if self.pol.strategy is not None:
                self.checkpoint()
                kids = [self.proc(c) for c in self.children.get(op.pid, []) if c in self.agents]
                s0 = self.strategy_ns
                self.pol.strategy.phase_end(self.proc(op.pid), kids)
                self.checkpoint(rebase=True)
                return self.strategy_ns - s0, 0
            return 0, 0
        raise RealRunError(f"op kind {kind!r} cannot run on the real kernel")

    def cleanup(self) -> list[int]:
        """End every agent still running; the OS pids that had to be killed."""
        killed = []
        for a in list(self.agents.values()):
            try:
                a.sock.settimeout(5.0)
                a.call("exit")
            except (RealRunError, OSError):
                pass
            try:
                a.sock.close()
            except OSError:
                pass
        for pid in self.all_pids:
            if is_agent(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
        for a in list(self.agents.values()):
            if a.popen is not None:
                try:
                    a.popen.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        for pid in self.all_pids:
            wait_gone(pid, 2.0)
        self.agents.clear()
        return killed

    def run(self, progress: ProgressFn | None = None) -> dict[str, Any]:
        from ..workloads import ops as O
        from ..workloads.ops import check_order

        t0 = time.perf_counter()
        vm0 = procfs.read_vmstat()
        cg0 = self.cg.stat() if self.cg is not None else None
        try:
            start = time.perf_counter_ns()
            for seq, op in enumerate(check_order(self.workload.ops(self.sc.seed))):
                if self.paced:
                    ahead = start + op.t - time.perf_counter_ns()
                    if ahead > 0:
                        time.sleep(ahead / 1e9)
                self.advance_to(op.t)
                if op.kind == O.FORK and self.vm_fork is None:
                    self.vm_fork = procfs.read_vmstat()
                    self.cg_fork = self.cg.stat() if self.cg is not None else None
                wall, flt = self.apply(op)
                r = self.rows
                r["seq"].append(seq)
                r["t_ns"].append(op.t)
                r["kind"].append(op.kind)
                r["pid"].append(op.pid)
                r["phase"].append(op.phase)
                r["n"].append(op.n)
                r["wall_ns"].append(wall)
                r["minflt"].append(flt)
                r["since_fork"].append(self.vm_fork is not None)
                if progress is not None:
                    progress(min(op.t, self.duration), self.duration)
            self.advance_to(self.duration)
            if not self.samples["t_ns"] or self.samples["t_ns"][-1] != self.duration:
                self.sample(self.duration)
            self.checkpoint()
            vm1 = procfs.read_vmstat()
            cg1 = self.cg.stat() if self.cg is not None else None
        finally:
            self.killed = self.cleanup()
        out = {"vm0": vm0, "vm1": vm1, "vm_fork": self.vm_fork or vm0,
               "cg0": cg0, "cg1": cg1, "cg_fork": self.cg_fork or cg0,
               "wall_s": time.perf_counter() - t0}
        return out


def _quantile(x: np.ndarray, q: float) -> float:
    return float(np.percentile(x, q)) if len(x) else math.nan


def lock_busy() -> bool:
    """Does another lab run hold :func:`thpcow.lab.scenario.lab_lock` now?"""
    import fcntl

    from .scenario import LOCK_PATH

    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)                      # closing the only fd of this open drops a lock taken here
    return False


def run_real(scenario, policy: str, progress: ProgressFn | None = None, *, runs: int = 2,
             max_runs: int = 4, on_wait: Callable[[], None] | None = None, paced: bool = False) -> RealResult:
    """Run one policy of ``scenario`` on the running kernel (see the module docstring).

    RealRunError (one line) when THP is unavailable, the policy needs a kernel change, memory is
    short or an agent fails.  Holds :func:`thpcow.lab.scenario.lab_lock` while it runs;
    ``on_wait()`` is called first when another lab run holds it.  ``paced``: each op waits for its
    time ``t`` (from the first op), so the run lasts as long as the op stream and the kernel's
    threads (khugepaged) get their time; by default ops run as fast as they go.
    """
    from ..experiments.scenario import resolve_scenario
    from .scenario import lab_lock, settled

    sc = resolve_scenario(scenario)
    why = real_support(policy)
    if why:
        raise RealRunError(f"policy {policy}: {why}")
    ok, reason = procfs.thp_available()
    if not ok:
        raise RealRunError(f"THP is not available on this kernel: {reason}")
    results: list[tuple[_Once, dict]] = []
    scores: list[tuple[int, int]] = []
    if on_wait is not None and lock_busy():
        on_wait()
    cg = open_cgroup()
    try:
        with lab_lock():
            while len(results) < max(runs, 1):
                once = _Once(sc, policy, cg, paced)
                res = once.run(progress)
                results.append((once, res))
                vm0, vm1 = res["vm0"], res["vm1"]
                scores.append((sum(vm1[k] - v for k, v in vm0.items() if k.startswith("thp_") and k in vm1),
                               vm1.get("pgfault", 0) - vm0.get("pgfault", 0)))
                if len(results) >= runs and settled(scores):
                    break
                if len(results) >= max_runs:
                    break
                runs = max(runs, len(results) + 1)
    finally:
        if cg is not None:
            cg.close()
    best = min(range(len(results)), key=lambda i: scores[i])
    once, res = results[best]
    out = _result(sc, policy, once, res, scores, settled(scores), len(results))
    out.agent_pids = [pid for o, _r in results for pid in o.all_pids]
    out.paced = paced
    out.summary["stream_s"] = once.duration / 1e9
    if any(o.killed for o, _r in results):
        out.notes.append(f"agents {[p for o, _r in results for p in o.killed]} did not exit when asked "
                         "and were killed")
    return out


def _result(sc, policy: str, once: _Once, res: dict, scores, is_settled: bool, nruns: int) -> RealResult:
    from ..workloads import workload_class

    vm0, vm1, vmf = res["vm0"], res["vm1"], res["vm_fork"]
    rows = once.rows
    kinds = np.asarray(rows["kind"], dtype=object)
    phases = np.asarray(rows["phase"], dtype=object)
    wall = np.asarray(rows["wall_ns"], dtype=np.float64)
    flt = np.asarray(rows["minflt"], dtype=np.int64)
    since = np.asarray(rows["since_fork"], dtype=bool)
    if not since.any():
        since[:] = True
    measure = workload_class(sc.workload).measure_phase
    lat = wall[(kinds == "write") & (phases == measure)] / 1000.0
    summary: dict[str, Any] = {"policy": policy}
    for c in REAL_COUNTERS:
        if c in vm1:
            summary[c] = int(vm1[c] - vmf[c])
            summary[c + "_run"] = int(vm1[c] - vm0[c])
    source = "/proc/vmstat (system-wide)"
    if res["cg1"] is not None:
        source = ("thp_fault_alloc, thp_collapse_alloc: the run's memory cgroup (v2 memory.stat); "
                  "the others: /proc/vmstat (system-wide)")
        cgf, cg1, cg0 = res["cg_fork"], res["cg1"], res["cg0"]
        for c in ("thp_fault_alloc", "thp_collapse_alloc"):
            if c in cg1:
                summary[c] = int(cg1[c] - cgf.get(c, 0))
                summary[c + "_run"] = int(cg1[c] - cg0.get(c, 0))
    summary["pgfault_vmstat"] = summary.get("pgfault", 0)
    summary["pgfault"] = int(flt[since].sum())
    summary["pgfault_run"] = int(flt.sum())
    summary["cow_mib"] = once.cow_pages * PAGE_SIZE / MIB
    summary["peak_anon_huge_mib"] = max(once.sample_sums, default=0) / 1024.0
    summary["lat_p50_us"] = _quantile(lat, 50)
    summary["lat_p99_us"] = _quantile(lat, 99)
    summary["lat_p999_us"] = _quantile(lat, 99.9)
    summary["lat_max_us"] = float(lat.max()) if len(lat) else math.nan
    summary["write_batches"] = int(len(lat))
    summary["op_ms"] = float(wall.sum()) / 1e6
    summary["wall_s"] = res["wall_s"]
    summary["ops"] = int(len(kinds))
    return RealResult(policy, summary, rows, once.samples, [], nruns, list(scores), is_settled, source)


_KNOB_STATS = ("khugepaged/full_scans", "khugepaged/pages_collapsed", "hpage_pmd_size")   # read-only figures


def sim_knobs(sc) -> dict[str, str]:
    """The THP knobs the simulated kernel runs the scenario with: its boot values, then the
    scenario's sysfs writes (as the runner makes them)."""
    from ..kernel import Kernel

    k = Kernel(ram=64 * MIB, seed=0)
    for path, value in sc.sysfs.items():
        k.sysfs.write(path, value)
    out = {}
    for path in k.sysfs.paths():
        try:
            out[path] = procfs.knob_value(k.sysfs.read(path))
        except (OSError, ValueError):
            continue
    return out


def knob_differences(sc) -> list[str]:
    """The THP knobs the simulator runs the scenario with (its defaults and the scenario's sysfs
    values) that differ from this machine's, which is never written."""
    try:
        knobs = procfs.read_thp_knobs()
    except procfs.LabError:
        return []
    sim = sim_knobs(sc)
    out = []
    for path, have in knobs.items():
        if path in _KNOB_STATS:
            continue
        want = sim.get(path)
        if want is not None and str(have) != str(want):
            how = "scenario" if path in sc.sysfs else "simulator's default"
            out.append(f"{path}: {how} {want}, this machine {have}")
    return out


# ---------------------------------------------------------------------------------------------
# sim beside real: one table per policy, and a line for every difference
# ---------------------------------------------------------------------------------------------

# (label, sim key, real key, exact): counters both sides count are compared exactly.
FIGURES: tuple[tuple[str, str, str, bool], ...] = (
    ("COW MiB", "cow_mib", "cow_mib", False),
    ("thp_split_pmd", "thp_split_pmd", "thp_split_pmd", True),
    ("thp_fault_alloc", "thp_fault_alloc", "thp_fault_alloc", True),
    ("thp_collapse_alloc", "thp_collapse_alloc", "thp_collapse_alloc", True),
    ("thp_deferred_split_page", "thp_deferred_split_page", "thp_deferred_split_page", True),
    ("pgfault", "pgfault", "pgfault", True),
    ("pgreuse", "pgreuse", "pgreuse", True),
    ("thp_fault_alloc, whole run", "thp_fault_alloc_run", "thp_fault_alloc_run", True),
    ("thp_split_pmd, whole run", "thp_split_pmd_run", "thp_split_pmd_run", True),
    ("peak AnonHugePages MiB", "peak_anon_huge_mib", "peak_anon_huge_mib", False),
    ("write p50 µs", "lat_p50_us", "lat_p50_us", False),
    ("write p99 µs", "lat_p99_us", "lat_p99_us", False),
    ("op time ms", "model_ms", "op_ms", False),
)
COW_TOLERANCE = 0.01              # COW MiB within 1 %: equal up to the pages a khugepaged collapse moved


def sim_extras(summary: dict, ops, samples) -> dict:
    """The sim's figures that its summary row lacks: whole-run counters (every ops row) and the
    peak AnonHugePages of all processes at one sample (MiB).  ``ops``/``samples``: that policy's
    rows of the compare's DataFrames."""
    out = dict(summary)
    for c in ("thp_fault_alloc", "thp_split_pmd", "pgfault"):
        if ops is not None and c in ops:
            out[c + "_run"] = int(ops[c].sum())
    if samples is not None and len(samples):
        out["peak_anon_huge_mib"] = float((samples["anon_huge_kb"] + samples["child_anon_huge_kb"]).max()) / 1024.0
    return out


def fmt_figure(v) -> str:
    """A figure as table text: floats with 1 or 2 decimals, counts with thousands separators."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.2f}"
    return f"{int(v):,}"


def _ratio(s, r) -> str:
    if s is None or r is None or (isinstance(s, float) and math.isnan(s)) or (isinstance(r, float) and math.isnan(r)):
        return "-"
    if r == 0:
        return "1.00" if s == 0 else "-"
    return f"{s / r:.2f}"


def side_by_side(sim: dict, real: "RealResult | None", why_not: str = "") -> list[list[str]]:
    """Rows [figure, sim, real, model/real] for one policy; ``why_not`` fills the real column when
    the policy did not run for real."""
    rows = []
    for label, sk, rk, _exact in FIGURES:
        s = sim.get(sk)
        if real is None:
            rows.append([label, fmt_figure(s), why_not or "-", "-"])
            continue
        r = real.summary.get(rk)
        rows.append([label, fmt_figure(s), fmt_figure(r), _ratio(s, r)])
    if real is not None:
        rows.append(["run wall s", fmt_figure(sim.get("sim_wall_s")), fmt_figure(real.summary.get("wall_s")), "-"])
    return rows


def explain(sim: dict, real: RealResult, sc) -> list[str]:
    """One short line per figure both sides count that differs, saying why (or that it is not
    explained)."""
    notes = []
    knobs = knob_differences(sc)
    khd = [k for k in knobs if k.startswith("khugepaged/")]
    noisy = not real.settled
    s_ = real.summary
    if getattr(sc, "fragmentation", 0):
        notes.append(f"the scenario fragments the simulator's {sc.ram_mib} MiB (fragmentation="
                     f"{sc.fragmentation:g}); the real run has this machine's free memory as it is")
    if sim.get("oom"):
        notes.append(f"the simulator ran out of its {sc.ram_mib} MiB; the real run has no such limit")
    for label, sk, rk, exact in FIGURES:
        if not exact and sk != "cow_mib":
            continue
        s, r = sim.get(sk), s_.get(rk)
        if s is None or r is None:
            continue
        if sk == "cow_mib":
            if abs(s - r) <= COW_TOLERANCE * max(s, r, 1e-9):
                continue
            extra = ""
            if s_.get("thp_collapse_alloc", 0):
                extra = f"; khugepaged collapsed {s_['thp_collapse_alloc']} PMDs while pages were followed"
            notes.append(f"COW MiB: sim {s:.1f}, real {r:.1f} (pagemap PFN changes{extra})")
            continue
        if int(s) == int(r):
            continue
        d = int(r) - int(s)
        collapse_differs = sim.get("thp_collapse_alloc", 0) != s_.get("thp_collapse_alloc", 0)
        if sk in ("pgfault", "pgreuse") and collapse_differs:
            notes.append(f"{label}: real {d:+,}: khugepaged collapsed a different number of PMDs, and a "
                         "split THP that is not collapsed again takes a fault (a reuse) at each page's "
                         "first write after the child's exit")
        elif sk == "pgfault":
            notes.append(f"{label}: real {d:+,}: the agents' own faults around their ops include the "
                         "interpreter's (NumPy temporaries, message buffers), not only the workload's")
        elif sk == "pgreuse":
            notes.append(f"{label}: real {d:+,}: /proc/vmstat is system-wide: other processes' reuses "
                         "count too (and the agents' interpreters share their heaps after fork)")
        elif sk == "thp_collapse_alloc":
            why = (f"khugepaged's pace differs ({'; '.join(khd)}; sysfs is not written)" if khd
                   else "khugepaged ran on its own schedule")
            stream, wall = s_.get("stream_s"), s_.get("wall_s")
            if not real.paced and stream and wall and stream > 1.5 * wall:
                why += (f"; the stream spans {stream:,.1f} s, the real run took {wall:,.1f} s (not paced: "
                        "--real-paced gives khugepaged the stream's time)")
            notes.append(f"{label}: khugepaged collapsed {int(s)} PMDs in the simulator, {int(r)} here: {why}")
        elif noisy:
            notes.append(f"{label}: real {d:+,}: other processes made THP events during every run "
                         f"(system-wide /proc/vmstat, THP scores {[x[0] for x in real.scores]}): noisy")
        elif sk == "thp_deferred_split_page" and sim.get("thp_collapse_alloc", 0) != s_.get("thp_collapse_alloc", 0):
            notes.append(f"{label}: real {d:+,}: follows the khugepaged collapses, which differ")
        elif knobs:
            notes.append(f"{label}: real {d:+,}: the machine's THP settings differ ({'; '.join(knobs)})")
        else:
            notes.append(f"{label}: real {d:+,}: not explained (a difference between the model and this kernel)")
    return notes
