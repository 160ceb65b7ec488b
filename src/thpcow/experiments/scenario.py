"""Scenario files: one machine, one workload, the COW policies to compare, in YAML.

Schema (every field but ``workload`` is optional)::

    name: redis-256m            # default: the file name without .yaml
    description: free text
    machine: amd-zen4-genoa     # machine preset (TLB model); see machine_presets()
    tlb_model: true             # run the workload's accesses through the TLB model (tlb_misses,
                                #   tlb_ms); false skips it: faster, and those columns are NaN
    ram_mib: 1024               # simulated RAM (MiB), >= 16; under 512 the kernel boots with THP off
                                #   (hugepage_init), so set sysfs.enabled to turn it on
    fragmentation: 0.0          # share of free memory broken by unmovable pages, 0..1
    seed: 0                     # one seed for the kernel and the workload
    check: false                # run the invariant checker after every call (slow)
    tlb_in_latency: false       # one clock: each op's translation time (TLB model) in its cost
    loop: none                  # none | open | closed: when ops start (experiments/loop.py); under a
                                #   loop translation time is always in an op's cost
    think_us: 0                 # closed loop: a client's pause after each op (on top of the workload's gaps)
    cores: 0                    # CPUs for clients + background (khugepaged...); 0: background is free
    profile: cal.toml           # latency profile written by `thpcow calibrate` (a path, relative to
                                #   the scenario file), a cost preset's name, or auto (this machine's);
                                #   default: the reference profile
    sample_ms: 5                # THP coverage / memory sampling interval; default duration/200
    sysfs:                      # written in order under /sys/kernel/mm/transparent_hugepage/, after
      enabled: madvise          #   the policy attached (so they win over e.g. thp-cow-v1's thp_cow),
                                #   the value exactly as `echo VALUE > file` would write it
      khugepaged/scan_sleep_millisecs: 100
    workload:
      name: redis-bgsave        # one of thpcow.workloads.REGISTRY
      dataset_mib: 256          # the workload's parameters (`thpcow workloads` lists them)
    policies:                   # COW policies, "name" or "name:key=value,..."; default [upstream]
      - upstream
      - thp-cow-v1

Errors are :class:`ScenarioError` (a ValueError) and read
``FILE:LINE: FIELD: what is wrong``, with the line of the offending value.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

DEFAULT_PATH = os.path.join(os.path.dirname(__file__), "default.yaml")

FIELDS = ("name", "description", "machine", "tlb_model", "ram_mib", "fragmentation", "seed", "check",
          "tlb_in_latency", "loop", "think_us", "cores", "profile",
          "sample_ms", "sysfs", "workload", "policies")

DEFAULT_MACHINE = "amd-zen4-genoa"
LOOPS = ("none", "open", "closed")            # experiments/loop.py
# Used when thpcow.machine cannot be imported: the core of the calibration VM.
FALLBACK_PRESETS = {DEFAULT_MACHINE: "AMD Zen 4 (EPYC 9004), the core of the calibration VM"}


def machine_presets() -> dict[str, str]:
    """Machine preset names (thpcow.machine's PRESETS when importable) and where each comes from."""
    try:
        from ..machine import PRESETS
    except ImportError:
        return dict(FALLBACK_PRESETS)
    return {name: str(getattr(knobs, "source", "") or name) for name, knobs in PRESETS.items()}


class ScenarioError(ValueError):
    """A scenario (or sweep grid) that does not follow the schema: names the file, line and field."""

    def __init__(self, source: str, line: int | None, fld: str, msg: str) -> None:
        self.source, self.line, self.field, self.msg = source, line, fld, msg
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: {fld}: {msg}" if fld else f"{where}: {msg}")


@dataclass
class Scenario:
    """A validated scenario (see the module docstring for the fields)."""

    workload: str
    params: dict[str, Any]
    name: str = "scenario"
    description: str = ""
    machine: str = DEFAULT_MACHINE
    tlb_model: bool = True
    ram_mib: int = 1024
    fragmentation: float = 0.0
    seed: int = 0
    check: bool = False
    tlb_in_latency: bool = False         # add each op's translation time (TLB model) to its cost
    loop: str = "none"                   # none | open | closed (experiments/loop.py)
    think_us: float = 0.0                # closed loop: think time after each op
    cores: int = 0                       # cores for clients + background; 0: background is free
    profile: str | None = None           # a profile file (thpcow calibrate), a cost preset or auto; None: the reference
    sample_ms: float | None = None
    sysfs: dict[str, str] = field(default_factory=dict)
    policies: list[str] = field(default_factory=lambda: ["upstream"])
    source: str = "<scenario>"

    def make_workload(self):
        """The workload object, built from the (already validated) parameters."""
        from ..workloads import get_workload
        return get_workload(self.workload, **self.params)

    def to_dict(self) -> dict[str, Any]:
        """The scenario as plain data (what a YAML file holds); ``source`` is left out."""
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["machine"] = self.machine
        if not self.tlb_model:
            out["tlb_model"] = False
        out.update(ram_mib=self.ram_mib, fragmentation=self.fragmentation, seed=self.seed, check=self.check)
        if self.tlb_in_latency:
            out["tlb_in_latency"] = True
        if self.loop != "none":
            out["loop"] = self.loop
        if self.think_us:
            out["think_us"] = self.think_us
        if self.cores:
            out["cores"] = self.cores
        if self.profile is not None:
            out["profile"] = self.profile
        if self.sample_ms is not None:
            out["sample_ms"] = self.sample_ms
        out["sysfs"] = dict(self.sysfs)
        out["workload"] = {"name": self.workload, **self.params}
        out["policies"] = list(self.policies)
        return out

    def to_yaml(self) -> str:
        import yaml
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_policies(self, policies: list[str]) -> "Scenario":
        """The same scenario with another policy list (validated)."""
        checked = [_check_policy("policies argument", None, f"policies[{i}]", p) for i, p in enumerate(policies)]
        if not checked:
            raise ScenarioError("policies argument", None, "policies", "at least one policy is needed")
        return replace(self, policies=checked)


# -- YAML with line numbers ------------------------------------------------------------------
def compose(text: str, source: str):
    """The YAML node tree of ``text`` (marks carry ``source``); ScenarioError on a syntax error."""
    import yaml

    loader = yaml.SafeLoader(text)
    loader.name = source
    try:
        node = loader.get_single_node()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ScenarioError(source, line, "", f"not valid YAML: {problem}") from None
    finally:
        loader.dispose()
    if node is None:
        raise ScenarioError(source, 1, "", "the file is empty")
    return node


def line_of(node) -> int:
    return node.start_mark.line + 1


def err(node, fld: str, msg: str) -> ScenarioError:
    """An error at ``node``: its own file (a sweep grid's value comes from the grid file) and line."""
    return ScenarioError(node.start_mark.name, line_of(node), fld, msg)


def value_of(node) -> Any:
    """The Python value of a YAML node (safe constructors)."""
    import yaml

    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


def mapping(node, source: str, fld: str) -> dict[str, tuple[Any, Any]]:
    """{key: (key node, value node)} of a mapping node; duplicate or non-string keys are errors."""
    import yaml

    if not isinstance(node, yaml.MappingNode):
        raise err(node, fld or "document", "expected a mapping (key: value lines)")
    out: dict[str, tuple[Any, Any]] = {}
    for knode, vnode in node.value:
        key = value_of(knode)
        if not isinstance(key, str):
            raise err(knode, fld or "document", f"key {key!r} is not a string")
        if key in out:
            raise err(knode, _join(fld, key),
                                f"given twice (first on line {line_of(out[key][0])})")
        out[key] = (knode, vnode)
    return out


def _join(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else key


def _scalar(source: str, fld: str, vnode, kind: type, lo=None, hi=None) -> Any:
    import yaml

    if not isinstance(vnode, yaml.ScalarNode):
        raise err(vnode, fld, f"expected a {kind.__name__}, got a "
                            f"{'list' if isinstance(vnode, yaml.SequenceNode) else 'mapping'}")
    val = value_of(vnode)
    names = {int: "an integer", float: "a number", bool: "a boolean (true/false)", str: "a string"}
    ok = (isinstance(val, bool) if kind is bool else
          isinstance(val, int) and not isinstance(val, bool) if kind is int else
          isinstance(val, (int, float)) and not isinstance(val, bool) if kind is float else
          isinstance(val, str))
    if not ok:
        raise err(vnode, fld, f"expected {names[kind]}, got {vnode.value!r}")
    if kind is float:
        val = float(val)
    if lo is not None and val < lo:
        raise err(vnode, fld, f"{val!r} must be >= {lo}")
    if hi is not None and val > hi:
        raise err(vnode, fld, f"{val!r} must be <= {hi}")
    return val


def _check_policy(source: str, node, fld: str, spec: Any) -> str:
    """The policy spec, checked by building it and attaching it to a tiny kernel."""
    from ..kernel import Kernel
    from .policies import parse_policy

    def fail(msg: str) -> ScenarioError:
        return err(node, fld, msg) if node is not None else ScenarioError(source, None, fld, msg)

    if not isinstance(spec, str):
        raise fail(f"expected a policy name string, got {spec!r}")
    try:
        pol = parse_policy(spec)
        Kernel(ram=16 << 20, build=pol.build)
    except ValueError as exc:
        raise fail(str(exc)) from None
    return spec.strip()


# -- the schema ------------------------------------------------------------------------------
def scenario_from_node(node, source: str, base_dir: str | None = None, default_name: str = "scenario") -> Scenario:
    """Validate a composed YAML tree against the schema; ScenarioError names the line and field."""
    import yaml

    fields = mapping(node, source, "")
    for key, (knode, _v) in fields.items():
        if key not in FIELDS:
            raise err(knode, key, f"unknown field; known: {', '.join(FIELDS)}")
    if "workload" not in fields:
        raise err(node, "workload", "missing (e.g. workload: {name: redis-bgsave})")
    kw: dict[str, Any] = {"source": source, "name": default_name}
    for key, (kind, lo, hi, _doc) in scalar_fields().items():
        if key in fields:
            kw[key] = _scalar(source, key, fields[key][1], kind, lo, hi)
    if "loop" in kw and kw["loop"] not in LOOPS:
        raise err(fields["loop"][1], "loop", f"{kw['loop']!r}: expected one of {', '.join(LOOPS)}")
    if "profile" in fields:
        kw["profile"] = _profile(source, fields["profile"][1], base_dir)
    if "machine" in kw and kw["machine"] not in machine_presets():
        raise err(fields["machine"][1], "machine",
                            f"unknown preset {kw['machine']!r}; known: {', '.join(machine_presets())}")
    if "sysfs" in fields:
        kw["sysfs"] = _sysfs(source, fields["sysfs"][1])
    kw["workload"], kw["params"] = _workload(source, fields["workload"][1], base_dir)
    if "policies" in fields:
        pnode = fields["policies"][1]
        if not isinstance(pnode, yaml.SequenceNode) or not pnode.value:
            raise err(pnode, "policies", "expected a non-empty list of policy names")
        pols = [_check_policy(source, item, f"policies[{i}]", value_of(item))
                for i, item in enumerate(pnode.value)]
        for i, p in enumerate(pols):
            if p in pols[:i]:
                raise err(pnode.value[i], f"policies[{i}]", f"{p!r} is listed twice")
        kw["policies"] = pols
    return Scenario(**kw)


def _sysfs(source: str, node) -> dict[str, str]:
    import yaml

    from ..kernel.errors import KernelError
    from ..kernel.sysfs import Sysfs

    scratch = Sysfs()
    out: dict[str, str] = {}
    for key, (_k, vnode) in mapping(node, source, "sysfs").items():
        fld = f"sysfs.{key}"
        if not isinstance(vnode, yaml.ScalarNode):
            raise err(vnode, fld, "expected a value (what `echo VALUE > file` writes)")
        text = vnode.value
        try:
            scratch.write(key, text)
        except KernelError as exc:
            raise err(vnode, fld, str(exc)) from None
        out[key] = text
    return out


def _workload(source: str, node, base_dir: str | None) -> tuple[str, dict[str, Any]]:
    from ..workloads import REGISTRY

    fields = mapping(node, source, "workload")
    if "name" not in fields:
        raise err(node, "workload.name",
                            f"missing; one of {', '.join(REGISTRY)}")
    name = _scalar(source, "workload.name", fields["name"][1], str)
    cls = REGISTRY.get(name)
    if cls is None:
        raise err(fields["name"][1], "workload.name",
                            f"unknown workload {name!r}; known: {', '.join(REGISTRY)}")
    params: dict[str, Any] = {}
    for key, (knode, vnode) in fields.items():
        if key == "name":
            continue
        fld = f"workload.{key}"
        if key not in cls.params:
            raise err(knode, fld,
                                f"not a parameter of {name}; known: {', '.join(cls.params)}")
        try:
            val = cls.coerce_param(key, value_of(vnode))
        except ValueError as exc:
            raise err(vnode, fld, str(exc)) from None
        if name == "trace" and key == "path" and base_dir and not os.path.isabs(val):
            val = os.path.normpath(os.path.join(base_dir, val))
        params[key] = val
    try:
        cls(**params)
    except ValueError as exc:
        import re
        named = re.search(r"parameter (\w+)", str(exc))     # point at the parameter the message names
        if named and named.group(1) in fields:
            raise err(fields[named.group(1)][1], f"workload.{named.group(1)}", str(exc)) from None
        raise err(node, "workload", str(exc)) from None
    return name, params


# -- loading ---------------------------------------------------------------------------------
def scalar_fields() -> dict[str, tuple[type, Any, Any, str]]:
    """The scalar fields of a scenario: (type, lowest, highest, what it is), as the parser checks them."""
    return {
        "name": (str, None, None, "the scenario's name (default: the file name without .yaml)"),
        "description": (str, None, None, "free text, shown in the report"),
        "machine": (str, None, None, "machine preset of the TLB model (default: "
                                     f"{DEFAULT_MACHINE}); one of {', '.join(machine_presets())}"),
        "tlb_model": (bool, None, None, "run the workload's accesses through the TLB model (default: true); "
                                        "false is faster and leaves tlb_misses/tlb_ms NaN"),
        "ram_mib": (int, 16, max_ram_mib(), "simulated RAM in MiB (default: 1024); under 512 the kernel "
                                            "boots with THP off (hugepage_init), so set sysfs.enabled; the "
                                            "highest value depends on this host's memory"),
        "fragmentation": (float, 0.0, 1.0, "share of free memory broken by unmovable pages (default: 0)"),
        "seed": (int, 0, None, "one seed for the kernel and the workload (default: 0)"),
        "check": (bool, None, None, "run the invariant checker after every call (slow; default: false)"),
        "tlb_in_latency": (bool, None, None, "one clock: add each op's address translation time (TLB model: "
                                             "L2 TLB hits and page walks) to its modelled cost, so latencies "
                                             "and fg ms include it (default: false; needs tlb_model)"),
        "loop": (str, None, None, "when each op starts (default: none, the workload's own times, no "
                                  "queueing); open: the workload's times are arrivals and an op that "
                                  "arrives while its client (workload pid) is busy waits, its latency "
                                  "including the wait; closed: a client issues its next op when the "
                                  "previous completes, after the workload's gap plus think_us, so slower "
                                  "ops delay later ones; under a loop each op's translation time (TLB "
                                  "model) is part of its cost"),
        "think_us": (float, 0.0, None, "closed loop: a client's think time after each op, on top of the "
                                       "workload's gaps (µs; default: 0; other loops ignore it)"),
        "cores": (int, 0, 4096, "under a loop, CPUs shared by the clients and the background (khugepaged, "
                                "kcompactd): with L live clients, L + 1 > cores takes the background's "
                                "time from the clients, each op of each client later by its share / L; "
                                "0 (default): background time is free; ignored without a loop"),
        "sample_ms": (float, 1e-6, None, "THP coverage / memory sampling interval in ms (default: the "
                                         "workload's duration / 200)"),
    }


OTHER_FIELDS = {
    "profile": "latency profile written by `thpcow calibrate` (a path, relative to the scenario file), "
               "a cost preset's name (`thpcow calibrate --list-presets`) or auto (this machine's cached "
               "profile, else its CPU's preset); default: the reference profile",
    "sysfs": "mapping of /sys/kernel/mm/transparent_hugepage/ files to values, written in order after "
             "the policy's kernel booted (so they win over e.g. thp-cow-v1's thp_cow), each exactly as "
             "`echo VALUE > file` would write it",
    "workload": "required: a mapping with `name` (one of the workloads below) and that workload's "
                "parameters",
    "policies": "list of COW policies, \"name\" or \"name:key=value,...\" (default: [upstream])",
}


def _profile(source: str, node, base_dir: str | None) -> str:
    """A latency profile: a path, resolved against the scenario's directory, or a cost preset's
    name or ``auto`` (this machine's: cost_presets.select()) when no such file exists; loaded
    once to check it."""
    from ..lab.calibrate import load_profile
    from ..machine.cost_presets import PRESETS

    path = value_of(node)
    if not isinstance(path, str) or not path:
        raise err(node, "profile", f"expected a profile file, a cost preset or auto, got {path!r}")
    if base_dir and not os.path.isabs(path):
        joined = os.path.join(base_dir, path)
        path = path if (path in PRESETS or path == "auto") and not os.path.exists(joined) else joined
    try:
        load_profile(path)
    except (OSError, ValueError) as exc:
        raise err(node, "profile", str(exc)) from None
    return path


def max_ram_mib() -> int:
    """The largest simulated RAM this host can hold: the simulator keeps about 83 bytes per 4 KiB
    frame (2 % of the simulated size), and may use up to 2/3 of the host's memory for it."""
    try:
        with open("/proc/meminfo") as fh:
            total_kib = next(int(line.split()[1]) for line in fh if line.startswith("MemTotal:"))
    except (OSError, StopIteration, ValueError):
        return 1 << 20                               # 1 TiB when the host cannot be asked
    return max(16, total_kib * 2 // 3 * 4096 // 83 // 1024)


def parse_scenario(text: str, source: str = "<string>", base_dir: str | None = None,
                   default_name: str = "scenario") -> Scenario:
    """A scenario from YAML text."""
    return scenario_from_node(compose(text, source), source, base_dir, default_name)


def load_scenario(path: str) -> Scenario:
    """A scenario from a YAML file (its name defaults to the file name)."""
    if not os.path.isfile(path):
        raise ScenarioError(path, None, "", "no such scenario file")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    stem = os.path.splitext(os.path.basename(path))[0]
    return parse_scenario(text, path, os.path.dirname(os.path.abspath(path)), stem)


def default_scenario() -> Scenario:
    """The built-in scenario (``default.yaml`` beside this module)."""
    return load_scenario(DEFAULT_PATH)


def resolve_scenario(spec: "Scenario | str | dict | None") -> Scenario:
    """A Scenario from a Scenario, a path, ``None``/"default" (the built-in one) or a dict."""
    if spec is None or (isinstance(spec, str) and spec == "default"):
        return default_scenario()
    if isinstance(spec, Scenario):
        return spec
    if isinstance(spec, dict):
        import yaml
        return parse_scenario(yaml.safe_dump(spec, sort_keys=False), "<dict>",
                              default_name=str(spec.get("name", "scenario")))
    if isinstance(spec, (str, os.PathLike)):
        return load_scenario(os.fspath(spec))
    raise TypeError(f"scenario={spec!r}: expected a Scenario, a path, a dict or None")
