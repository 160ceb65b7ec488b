"""The differential harness (thpcow.lab.programs): seeded random programs on the simulator and
on the running kernel, compared step by step; noise told from differences; differences shrunk."""

from __future__ import annotations

import os
import random
import time

import pytest

from thpcow.kernel import MADV_NOHUGEPAGE
from thpcow.lab import programs as prg

from conftest import skip_without_real_thp


def test_random_programs_are_seeded_and_safe() -> None:
    a = [prg.random_program(random.Random(7)) for _ in range(3)]
    b = [prg.random_program(random.Random(7)) for _ in range(3)]
    assert a == b
    for seed in range(40):
        program = prg.random_program(random.Random(seed), steps=20)
        assert len(program) == 20 and prg.program_is_safe(program)
        assert {s[0] for s in program} <= {"map", "adv", "prot", "unmap", "touch", "fork"}
        assert all(s[2] - s[1] in range(2 << 20, (8 << 20) + 1) and s[1] % (2 << 20) == 0
                   for s in program if s[0] == "map")


def test_an_unsafe_program_is_recognised() -> None:
    assert not prg.program_is_safe([("touch", 0, 4096)])
    assert not prg.program_is_safe([("map", 0, 2 << 20, prg.R), ("touch", 0, 4096)])
    assert prg.program_is_safe([("map", 0, 2 << 20, prg.RW), ("touch", 0, 4096)])


def _wrong_sim(program) -> dict:
    """The simulator with a planted bug: a VMA advised MADV_NOHUGEPAGE shows no 'nh' flag."""
    res = prg.run_sim(program, trace=True)
    nohuge = any(s[0] == "adv" and s[3] == MADV_NOHUGEPAGE for s in program)

    def strip(rows):
        return [[*r[:3], " ".join(f for f in r[3].split() if f != "nh"), *r[4:]] for r in rows]
    if nohuge:
        res = {"rcs": res["rcs"], "vmas": strip(res["vmas"]), "trace": [strip(t) for t in res["trace"]]}
    return res


def test_the_shrinker_reduces_an_injected_difference() -> None:
    res = prg.differential(12, seed=3, steps=16, sim_runner=_wrong_sim,
                           real_runner=lambda p: prg.run_sim(p, trace=True))
    assert res.programs == res.equal + res.noisy + res.different == 12
    assert res.noisy == 0 and res.different >= 1
    for o in res.outcomes:
        if o.verdict != "different":
            continue
        # the least that shows the bug: a mapping and MADV_NOHUGEPAGE over part of it
        assert [s[0] for s in o.minimal] == ["map", "adv"], prg.format_program(o.minimal)
        assert o.minimal[1][3] == MADV_NOHUGEPAGE
        assert o.real != o.sim


def test_equal_runners_make_no_difference() -> None:
    res = prg.differential(5, seed=1, real_runner=lambda p: prg.run_sim(p, trace=True))
    assert (res.programs, res.equal) == (5, 5)


@pytest.mark.realkernel
def test_simulator_and_running_kernel_agree_on_random_programs() -> None:
    reason = prg.real_kernel_reason()
    if reason:
        pytest.skip(reason)
    skip_without_real_thp(lambda: None if os.geteuid() == 0 else "not root (the lab's vmstat noise check and lock)")
    t0 = time.monotonic()
    res = prg.differential(10, seed=2026)
    assert time.monotonic() - t0 < 20
    assert res.programs == res.equal + res.noisy + res.different == 10
    assert res.different == 0, [(o.where, prg.format_program(o.minimal), o.real, o.sim)
                                for o in res.outcomes if o.verdict == "different"]
