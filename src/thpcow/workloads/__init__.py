"""Workloads: generators of timed operations that drive the simulated kernel.

Each workload is a class with documented, validated parameters (``params``)
whose :meth:`~thpcow.workloads.base.Workload.ops` yields :class:`Op` in time
order, deterministically for a seed.  :mod:`thpcow.experiments.runner`
applies a stream to a :class:`~thpcow.kernel.Kernel`.

>>> w = get_workload("redis-bgsave", dataset_mib=64)
>>> ops = list(w.ops(seed=0))
"""

from __future__ import annotations

from .base import Param, Workload
from .fork_writers import CopyAfterFork, Forkserver, ForkTouch, PreforkServer, PythonRefcount
from .ops import KINDS, Op, stream_digest
from .redis_bgsave import RedisBgsave
from .trace import Trace, read_trace, write_trace

REGISTRY: dict[str, type[Workload]] = {
    cls.name: cls for cls in (RedisBgsave, CopyAfterFork, PreforkServer, PythonRefcount, Forkserver, ForkTouch,
                               Trace)
}


def workload_class(name: str) -> type[Workload]:
    """The workload class called ``name``; ValueError listing the known ones."""
    cls = REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(REGISTRY)}")
    return cls


def get_workload(name: str, **params) -> Workload:
    """Build the workload ``name`` with ``params`` (validated)."""
    return workload_class(name)(**params)


__all__ = ["REGISTRY", "KINDS", "Op", "Param", "Workload", "get_workload", "workload_class", "stream_digest",
           "RedisBgsave", "CopyAfterFork", "PreforkServer", "PythonRefcount", "Forkserver", "ForkTouch", "Trace",
           "read_trace", "write_trace"]
