"""Package layout: what an import pulls in, the command line's verb table, the kernel module map."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys

from thpcow.cli import VERBS, app

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
HEAVY = ("pandas", "matplotlib", "dask")


def run_python(code: str) -> subprocess.CompletedProcess:
    """``python -c code`` with this tree's src first on the path."""
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), COLUMNS="200")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def imported_after(statement: str) -> list[str]:
    """The modules in sys.modules after running ``statement`` in a fresh interpreter."""
    proc = run_python(f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def loaded(modules: list[str], names: tuple[str, ...]) -> list[str]:
    return [m for m in modules if any(m == n or m.startswith(n + ".") for n in names)]


def test_importing_the_kernel_leaves_out_experiments_cli_and_heavy_libraries():
    mods = imported_after("import thpcow.kernel")
    assert "thpcow.kernel" in mods
    assert loaded(mods, ("thpcow.experiments", "thpcow.cli", *HEAVY)) == []


def test_thpcow_compare_is_still_there():
    proc = run_python("import thpcow, sys\n"
                      "assert 'thpcow.experiments.runner' not in sys.modules\n"
                      "from thpcow.experiments.runner import compare\n"
                      "assert thpcow.compare is compare and 'compare' in dir(thpcow)\n")
    assert proc.returncode == 0, proc.stderr


def test_help_lists_every_registered_verb():
    proc = subprocess.run([sys.executable, "-m", "thpcow.cli", "--help"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
                                   COLUMNS="200"))
    assert proc.returncode == 0, proc.stderr
    listed = re.findall(r"^│ (\S+) +(.*?) *│$", proc.stdout, re.M)
    verbs = [(verb, text) for verb, text in listed if not verb.startswith("--")]      # not the options
    assert [verb for verb, _ in verbs] == [verb for verb, _, _ in VERBS]
    assert dict(verbs) == {verb: text for verb, _, text in VERBS}


def test_help_does_not_import_pandas_matplotlib_or_dask():
    mods = imported_after("sys.argv = ['thpcow', '--help']\n"
                          "from thpcow.cli import main\n"
                          "try:\n    main()\nexcept SystemExit as exc:\n    assert exc.code == 0, exc.code\n")
    assert loaded(mods, HEAVY) == []
    assert {f"thpcow.cli.{module}" for _, module, _ in VERBS} <= set(mods)


def test_verb_table_help_is_the_first_paragraph_of_the_verb_docstring():
    commands = {c.name: c for c in app.registered_commands}
    assert list(commands) == [verb for verb, _, _ in VERBS]
    for verb, _module, text in VERBS:
        doc = inspect.getdoc(commands[verb].callback)
        assert " ".join(doc.split("\n\n")[0].split()) == text, verb


ARCHITECTURE = os.path.join(os.path.dirname(SRC), "docs", "architecture.md")
KERNEL_DIR = os.path.join(SRC, "thpcow", "kernel")


def kernel_module_map() -> list[str]:
    """The modules docs/architecture.md lists under ``kernel/`` in its ``src/thpcow/`` tree."""
    with open(ARCHITECTURE, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"^  kernel/\s", line))
    listed = []
    for line in lines[start + 1:]:
        if re.match(r"^  \S", line) or line.startswith("```"):
            break                                   # the next package (machine/) or the end of the tree
        m = re.match(r"^    (\w+\.py)(\s|$)", line)
        if m:
            listed.append(m.group(1))
    return listed


def test_architecture_lists_every_kernel_module_and_only_those():
    listed = kernel_module_map()
    assert len(listed) == len(set(listed)), f"listed twice: {sorted({m for m in listed if listed.count(m) > 1})}"
    present = {f for f in os.listdir(KERNEL_DIR) if f.endswith(".py") and f != "__init__.py"}
    assert present - set(listed) == set(), "kernel modules missing from docs/architecture.md's module map"
    assert set(listed) - present == set(), "docs/architecture.md lists kernel modules that do not exist"


def test_no_merge_conflict_markers_are_left():
    """A conflicted merge must never land: no line of a tracked text file starts a conflict marker."""
    import pathlib
    import re
    root = pathlib.Path(__file__).resolve().parent.parent
    marker = re.compile(r"^(<{7} |={7}$|>{7} )", re.M)
    bad = []
    for sub in ("src", "tests", "docs", "benchmarks"):
        for path in (root / sub).rglob("*"):
            if path.suffix in (".py", ".md", ".yaml", ".toml", ".txt") and path.is_file():
                if marker.search(path.read_text(errors="replace")):
                    bad.append(str(path.relative_to(root)))
    for name in ("README.md", "Makefile", "pyproject.toml"):
        if marker.search((root / name).read_text()):
            bad.append(name)
    assert not bad, bad


def test_the_schema_page_is_generated_from_the_validators_definitions():
    """docs/schema.md is what `python -m thpcow.experiments.schema` prints (regenerate it after a change)."""
    from thpcow.experiments.schema import schema_markdown
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "schema.md"), encoding="utf-8") as fh:
        assert fh.read() == schema_markdown(), "docs/schema.md is stale: python -m thpcow.experiments.schema"


def test_no_undefined_names_in_the_package():
    """pyflakes finds no undefined name in src/ (a merge once dropped an import that a function
    on a rare path used; only a fuzzer found it)."""
    import io

    from pyflakes.api import checkRecursive
    from pyflakes.reporter import Reporter
    out = io.StringIO()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    checkRecursive([os.path.join(root, "src", "thpcow")], Reporter(out, io.StringIO()))
    undefined = [line for line in out.getvalue().splitlines()
                 if "undefined name" in line and "unable to detect" not in line]
    assert undefined == []
