"""The package's import graph has no cycle (imports inside functions count), and every project error is a VisaeError."""

import ast
import importlib
import inspect

import pytest

from conftest import REPO

PKG = REPO / "visae"


def _modules() -> dict[str, object]:
    """{dotted module name: path} of every module of the package."""
    mods = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = list(f.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def import_graph() -> dict[str, dict[str, int]]:
    """{module: {imported package module: line}} from every import statement anywhere in the file.

    Statements inside functions and methods count as much as top-level ones: a lazy import
    only hides a cycle until the function runs. ``from a.b import c`` is an edge to ``a.b.c``
    when that is a module, else to ``a.b``; relative imports are resolved.
    """
    mods = _modules()

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in mods.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                if t == "visae" or t.startswith("visae."):
                    target = owner(t)
                    if target and target != mod:
                        edges.setdefault(target, node.lineno)
        graph[mod] = edges
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, {}))))
    return None


def test_the_cycle_finder_finds_cycles_and_lazy_imports():
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {}}) is None
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    graph = import_graph()
    # a function-level import is an edge: visae.sweep imports visae.select inside sweep()
    src = (PKG / "sweep.py").read_text()
    assert "    from visae.select import" in src and "visae.select" in graph["visae.sweep"]
    assert "visae.sae.base" in graph["visae.sae"] and "visae.atomic" in graph["visae.shards"]


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    cycle = find_cycle(graph)
    if cycle:
        paths = _modules()
        where = [f"{a} -> {b} ({paths[a].relative_to(REPO)}, line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
        pytest.fail("import cycle:\n  " + "\n  ".join(where))


def test_sweep_and_select_meet_only_in_sweepdir():
    graph = import_graph()
    assert "visae.sweep" not in graph["visae.select"]
    assert "visae.sweepdir" in graph["visae.select"] and "visae.sweepdir" in graph["visae.sweep"]
    # its low-level helpers only: atomic writes, the error base, and the checksums (a leaf: hashlib and json) with
    # which it tells a damaged trial
    assert set(graph["visae.sweepdir"]) <= {"visae.atomic", "visae.errors", "visae.integrity"}
    assert not set(graph["visae.integrity"])


def test_every_project_error_derives_from_visae_error():
    from visae.errors import VisaeError

    found, bad = [], []
    for mod in _modules():
        if mod.endswith(".__main__"):  # runs the command when imported
            continue
        m = importlib.import_module(mod)
        for name, obj in vars(m).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == mod
                    and not name.startswith("_")
                    and not issubclass(obj, KeyboardInterrupt)):  # visae.errors.Interrupted: Ctrl-C, not an error
                found.append(f"{mod}.{name}")
                if not issubclass(obj, VisaeError):
                    bad.append(f"{mod}.{name}")
    assert not bad, f"errors that do not derive from visae.errors.VisaeError: {bad}"
    # the exit-status rule of visae.errors: 2 for a bad input, 1 only where good input could not finish here
    by_code = {}
    for f in found:
        mod, _, name = f.rpartition(".")
        by_code.setdefault(getattr(importlib.import_module(mod), name).exit_code, set()).add(name)
    assert set(by_code) == {1, 2}, by_code
    assert by_code[1] == {"OutputLockedError", "WorkerStartError", "HubUnreachableError", "WeightsNotAvailableError",
                          "PortInUseError"}, \
        by_code[1]
    for expected in ("visae.config.ConfigError", "visae.shards.ShardError", "visae.train.TrainError",
                     "visae.sae.base.SAEFormatError", "visae.sweepdir.SweepError", "visae.select.SelectError"):
        assert any(f.endswith(expected.rpartition(".")[2]) for f in found), expected


def test_cli_prints_a_project_error_as_one_line(capsys, tmp_path, monkeypatch):
    from visae import cli
    from visae.config import ConfigError
    from visae.sweepdir import SweepError

    calls = iter([SweepError(f"{tmp_path}/sweep.json: field 'version' is 7\n(upgrade visae)"), ConfigError("--x: bad")])

    class Stage:
        @staticmethod
        def main(argv):
            raise next(calls)

    monkeypatch.setitem(cli.SUBCOMMANDS, "fake", ("fake_stage_module", "a stage that fails"))
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: Stage)
    monkeypatch.delenv("VISAE_TRACEBACK", raising=False)
    assert cli.main(["fake"]) == 2  # a bad artifact given: exit 2, as every stage's own main says it (visae.errors)
    err = capsys.readouterr().err
    assert err == f"visae fake: error: {tmp_path}/sweep.json: field 'version' is 7; (upgrade visae)\n"
    assert cli.main(["fake"]) == 2  # a usage error
    assert capsys.readouterr().err == "visae fake: error: --x: bad\n"


def test_a_script_reports_a_project_error_in_one_line(tmp_path):
    # scripts/*.py go through visae.cli; run from another directory so that only the script's own path idiom
    # finds this checkout (and scripts/ on sys.path shadows nothing of the standard library)
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "select_sae.py"), "--sweep", str(tmp_path / "nope")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("visae select: error: ") and "not a sweep directory" in lines[0], \
        proc.stderr[-2000:]
