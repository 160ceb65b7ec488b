"""Workload base class: documented, validated parameters and the helpers workloads share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import numpy as np

from ..kernel.constants import MADV_HUGEPAGE, PAGE_SHIFT, PAGE_SIZE
from .ops import MADVISE, MMAP, SPAWN, WRITE, Op

NSEC_PER_MSEC = 1_000_000
NSEC_PER_SEC = 1_000_000_000
MIB = 1 << 20


@dataclass(frozen=True)
class Param:
    """One workload parameter: default, type, documentation and range."""

    default: Any
    doc: str
    lo: float | None = None          # inclusive lower bound (numbers)
    hi: float | None = None          # inclusive upper bound (numbers)
    choices: tuple[str, ...] | None = None
    required: bool = False

    @property
    def kind(self) -> type:
        return type(self.default) if self.default is not None else str

    def describe(self) -> str:
        rng = ""
        if self.choices:
            rng = f" (one of {', '.join(self.choices)})"
        elif self.lo is not None or self.hi is not None:
            lo = "" if self.lo is None else _num(self.lo)
            hi = "" if self.hi is None else _num(self.hi)
            rng = f" ({lo}..{hi})"
        default = "required" if self.required else f"default {self.default!r}"
        return f"{self.doc}{rng}; {self.kind.__name__}, {default}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def coerce(owner: str, name: str, spec: Param, value: Any) -> Any:
    """``value`` as the parameter's type, within its range; ValueError naming the parameter."""
    where = f"{owner}: parameter {name}={value!r}"
    kind = spec.kind
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"{where}: expected a boolean (true/false)")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ValueError(f"{where}: expected an integer")
        try:
            out = int(value, 0) if isinstance(value, str) else int(value)
        except ValueError:
            raise ValueError(f"{where}: expected an integer") from None
        if isinstance(value, float) and out != value:
            raise ValueError(f"{where}: expected an integer")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{where}: expected a number")
        try:
            out = float(value)
        except ValueError:
            raise ValueError(f"{where}: expected a number") from None
        if not np.isfinite(out):
            raise ValueError(f"{where}: expected a finite number")
    else:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string")
        out = value
    if spec.choices and out not in spec.choices:
        raise ValueError(f"{where}: must be one of {', '.join(spec.choices)}")
    if spec.lo is not None and out < spec.lo:
        raise ValueError(f"{where}: must be >= {_num(spec.lo)}")
    if spec.hi is not None and out > spec.hi:
        raise ValueError(f"{where}: must be <= {_num(spec.hi)}")
    return out


class Workload:
    """Base class: a parameterised generator of timed operations (see :mod:`.ops`).

    Subclasses declare ``params`` (name -> :class:`Param`), ``measure_phase``
    (the phase whose write latency summarises the run) and implement
    :meth:`ops` and :meth:`duration_ns`; :meth:`check` validates combinations.
    """

    name: ClassVar[str] = "base"
    help: ClassVar[str] = ""
    params: ClassVar[dict[str, Param]] = {}
    measure_phase: ClassVar[str] = ""

    def __init__(self, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(self.params))
        if unknown:
            raise ValueError(f"workload {self.name}: unknown parameter(s) {', '.join(unknown)}; "
                             f"known: {', '.join(self.params) or 'none'}")
        for key, spec in self.params.items():
            if key not in kwargs and spec.required:
                raise ValueError(f"workload {self.name}: parameter {key} is required ({spec.doc})")
            val = kwargs.get(key, spec.default)
            setattr(self, key, coerce(f"workload {self.name}", key, spec, val) if val is not None else None)
        self.check()

    def validate(self) -> None:
        """Check what the parameters alone cannot (a trace's rows) before a run; ValueError naming it."""

    @classmethod
    def coerce_param(cls, key: str, value: Any) -> Any:
        """One parameter checked alone (for error reports that point at a line)."""
        if key not in cls.params:
            raise ValueError(f"workload {cls.name}: unknown parameter {key}; known: {', '.join(cls.params)}")
        return coerce(f"workload {cls.name}", key, cls.params[key], value)

    def check(self) -> None:
        """Cross-parameter validation (subclasses raise ValueError naming the parameters)."""

    def values(self) -> dict[str, Any]:
        """The parameters in force, defaults included."""
        return {key: getattr(self, key) for key in self.params}

    def __repr__(self) -> str:
        return f"{self.name}(" + ", ".join(f"{k}={v!r}" for k, v in self.values().items()) + ")"

    def ops(self, seed: int = 0) -> Iterator[Op]:
        """The operation stream; the same seed always gives the same stream."""
        raise NotImplementedError

    def duration_ns(self) -> int:
        """Simulated time the stream spans (the time of its last op)."""
        raise NotImplementedError

    @classmethod
    def describe(cls) -> str:
        """Multi-line help: one line per parameter."""
        lines = [f"{cls.name}: {cls.help}"]
        lines += [f"  {key}: {spec.describe()}" for key, spec in cls.params.items()]
        return "\n".join(lines)


# -- helpers shared by the workloads -----------------------------------------------------------
def ms(x: float) -> int:
    """Milliseconds to ns (rounded)."""
    return int(round(x * NSEC_PER_MSEC))


def populate_ops(pid: int, region: int, size: int, thp: bool, phase: str = "load", t: int = 0,
                 token: int = 1, spawn: bool = True) -> list[Op]:
    """spawn, mmap a region, MADV_HUGEPAGE it (if ``thp``) and write every page once."""
    out = [Op(t, SPAWN, pid, phase)] if spawn else []
    out.append(Op(t, MMAP, pid, phase, region=region, length=size))
    if thp:
        out.append(Op(t, MADVISE, pid, phase, region=region, length=size, arg=MADV_HUGEPAGE))
    out.append(Op(t, WRITE, pid, phase, region=region, offsets=page_offsets(0, size), token=token, nbytes=size))
    return out


def page_offsets(start: int, length: int) -> np.ndarray:
    """One offset per page of [start, start + length): the start, then each page start."""
    first, last = start >> PAGE_SHIFT, (start + length - 1) >> PAGE_SHIFT
    out = np.arange(first, last + 1, dtype=np.int64) << PAGE_SHIFT
    out[0] = start
    return out


def span_offsets(starts: np.ndarray, length: int) -> np.ndarray:
    """Offsets of stores of ``length`` bytes at each start: one per page each store touches, in order."""
    starts = np.asarray(starts, dtype=np.int64)
    if length <= PAGE_SIZE and not ((starts & (PAGE_SIZE - 1)) + length > PAGE_SIZE).any():
        return starts
    first = starts >> PAGE_SHIFT
    npg = ((starts + length - 1) >> PAGE_SHIFT) - first + 1
    rep = np.repeat(np.arange(len(starts)), npg)
    within = np.arange(len(rep)) - np.repeat(np.cumsum(npg) - npg, npg)
    out = (first[rep] + within) << PAGE_SHIFT
    out[within == 0] = starts
    return out


def per_tick(rate_per_s: float, tick_ns: int, nticks: int) -> np.ndarray:
    """How many events fall in each of ``nticks`` ticks at ``rate_per_s`` (cumulative rounding)."""
    edges = np.floor(np.arange(nticks + 1, dtype=np.float64) * rate_per_s * tick_ns / NSEC_PER_SEC)
    return np.diff(edges).astype(np.int64)


def zipf_ranks(rng: np.random.Generator, n: int, s: float, size: int) -> np.ndarray:
    """Ranks in [0, n) with P(rank r) ~ 1/(r+1)^s: inverse CDF of the continuous power law.

    The continuous approximation keeps memory O(1) whatever n is; the head
    of the distribution is slightly flatter than the discrete Zipf law.
    """
    u = rng.random(size)
    if abs(s - 1.0) < 1e-9:
        x = np.exp(u * np.log(n + 1.0))
    else:
        a = 1.0 - s
        x = (u * ((n + 1.0) ** a - 1.0) + 1.0) ** (1.0 / a)
    return np.clip(x.astype(np.int64) - 1, 0, n - 1)


def scramble(ranks: np.ndarray, n: int, salt: int) -> np.ndarray:
    """Spread ranks over [0, n) with a splitmix64 hash (YCSB's scrambled Zipfian, in spirit)."""
    z = ranks.astype(np.uint64) + np.uint64((salt * 0x9E3779B97F4A7C15) & ((1 << 64) - 1))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(n)).astype(np.int64)


READ_DISTS = ("uniform", "zipf", "sequential")


def read_params(what: str) -> dict[str, Param]:
    """The locality parameters every workload's loads share: ``read_dist`` and ``read_zipf_s``."""
    return {
        "read_dist": Param("uniform", f"where the loads fall in {what}: uniform 8-byte words, zipf "
                                      "(scrambled, over 64-byte lines) or sequential 64-byte lines (each "
                                      "reader goes on where it stopped)",
                           choices=READ_DISTS),
        "read_zipf_s": Param(0.99, "Zipf exponent of the loads (read_dist=zipf)", lo=0.01, hi=10.0),
    }


class Loads:
    """Load offsets of one workload's readers: one sequential cursor per reader, one law for all.

    ``offsets(rng, reader, n)`` gives ``n`` 8-byte-aligned offsets in
    [``start``, ``start + size``); deterministic for the generator's state.
    """

    LINE = 64

    def __init__(self, size: int, dist: str, zipf_s: float, start: int = 0, salt: int = 0) -> None:
        self.size, self.dist, self.zipf_s, self.start, self.salt = size, dist, zipf_s, start, salt
        self.lines = max(1, size // self.LINE)
        self.cursor: dict[int, int] = {}

    def offsets(self, rng: np.random.Generator, reader: int, n: int) -> np.ndarray:
        if self.dist == "uniform":
            return self.start + rng.integers(0, max(1, self.size // 8), size=n, dtype=np.int64) * 8
        if self.dist == "zipf":
            lines = scramble(zipf_ranks(rng, self.lines, self.zipf_s, n), self.lines, self.salt + reader)
        else:
            first = self.cursor.get(reader, 0)
            lines = (first + np.arange(n, dtype=np.int64)) % self.lines
            self.cursor[reader] = int((first + n) % self.lines)
        return self.start + lines * self.LINE


def keys(rng: np.random.Generator, nkeys: int, dist: str, zipf_s: float, size: int, salt: int = 0) -> np.ndarray:
    """``size`` key indices in [0, nkeys): uniform, or scrambled Zipfian with exponent zipf_s."""
    if dist == "uniform":
        return rng.integers(0, nkeys, size=size, dtype=np.int64)
    return scramble(zipf_ranks(rng, nkeys, zipf_s, size), nkeys, salt)
