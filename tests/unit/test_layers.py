"""The package's floors, read from the imports with `ast` (nothing is imported): the plugin never
imports the SFT stack, no import runs from a lower floor to a higher one, and no folder of
`q_tuning/` holds more than 12 modules. A new module must be given a floor in `FLOORS`."""

from __future__ import annotations

import ast
import pathlib
import sys
from typing import NamedTuple

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "q_tuning"
MAX_MODULES_PER_FOLDER = 12

# Module-name prefix -> floor; the longest matching prefix wins. A module may import its own floor
# and the floors below it, never one above.
FLOORS: dict[str, int] = {
    "q_tuning.config": 0, "q_tuning.report": 0, "q_tuning._files": 0,
    "q_tuning.parallel": 0,  # collectives, rank queries, process groups
    "q_tuning.token_stats": 1, "q_tuning.fused_stats": 1, "q_tuning.lse_stats": 1,  # kernels
    "q_tuning.selection": 1, "q_tuning.token_pruning": 1, "q_tuning.strategies": 1,
    "q_tuning.passes": 2,  # the schedule-calling passes
    "q_tuning.global_batch": 3, "q_tuning.pruner": 3,
    "q_tuning": 4,  # the package root re-exports the public API
    "q_tuning.observe": 4, "q_tuning.megatron_lm": 4, "q_tuning.slime": 4,  # integrations
    "q_tuning.sft": 5,  # the SFT stack: commands on top of the plugin
}


class Import(NamedTuple):
    module: str
    line: int
    target: str


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def q_tuning_imports(source: str, module: str) -> list[Import]:
    """Every `q_tuning` import in `source`, function-level ones included; `from X import y`
    counts as an import of `X.y` (y may be a module)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [Import(module, node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{module}:{node.lineno}: relative import; write it absolute")
            found += [Import(module, node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return [i for i in found if i.target.split(".")[0] == "q_tuning"]


def floor_of(name: str) -> int:
    matches = [p for p in FLOORS if name == p or name.startswith(p + ".")]
    if not matches:
        raise KeyError(name)
    return FLOORS[max(matches, key=len)]


def all_imports() -> list[Import]:
    return [i for path in sorted(PACKAGE.rglob("*.py"))
            for i in q_tuning_imports(path.read_text(), module_name(path))]


def upward(imports: list[Import]) -> list[str]:
    return [f"{i.module}:{i.line} imports {i.target} (floor {floor_of(i.target)} > "
            f"{floor_of(i.module)})" for i in imports if floor_of(i.target) > floor_of(i.module)]


def folders_over(limit: int) -> dict[str, int]:
    counts = {str(d.relative_to(PACKAGE.parent)): len(list(d.glob("*.py")))
              for d in [PACKAGE, *PACKAGE.rglob("*")] if d.is_dir() and d.name != "__pycache__"}
    return {d: n for d, n in counts.items() if n > limit}


def test_every_module_has_a_floor():
    unplaced = []
    for path in PACKAGE.rglob("*.py"):
        try:
            floor_of(module_name(path))
        except KeyError:
            unplaced.append(module_name(path))
    assert not unplaced, f"give these modules a floor in FLOORS: {unplaced}"


def test_the_plugin_imports_nothing_of_the_sft_stack():
    bad = [f"{i.module}:{i.line} imports {i.target}" for i in all_imports()
           if not i.module.startswith("q_tuning.sft") and i.target.startswith("q_tuning.sft")]
    assert not bad, bad


def test_no_import_runs_up_the_floors():
    bad = upward(all_imports())
    assert not bad, bad


def test_no_folder_has_more_than_12_modules():
    crowded = folders_over(MAX_MODULES_PER_FOLDER)
    assert not crowded, crowded


@pytest.mark.parametrize("module, source, expected", [
    ("q_tuning.pruner", "def f():\n    from q_tuning.sft.train import trainer\n",
     ["q_tuning.pruner:2 imports q_tuning.sft.train.trainer (floor 5 > 3)"]),
    ("q_tuning.token_stats", "import q_tuning.passes.scoring\n",
     ["q_tuning.token_stats:1 imports q_tuning.passes.scoring (floor 2 > 1)"]),
    ("q_tuning.parallel.comm", "from q_tuning import pruner\n",
     ["q_tuning.parallel.comm:1 imports q_tuning.pruner (floor 3 > 0)"]),
    ("q_tuning.passes.scoring", "from q_tuning.parallel import comm\nimport torch\n", []),
    ("q_tuning.sft.train.trainer", "from q_tuning.pruner import QTuningPruner\n", []),
])
def test_the_check_sees_an_upward_import(module, source, expected):
    """The checks above would fail on such an import (they are not vacuous)."""
    assert upward(q_tuning_imports(source, module)) == expected


def test_the_count_sees_a_crowded_folder(tmp_path, monkeypatch):
    (tmp_path / "q_tuning" / "crowded").mkdir(parents=True)
    for k in range(MAX_MODULES_PER_FOLDER + 1):
        (tmp_path / "q_tuning" / "crowded" / f"m{k}.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "q_tuning")
    assert folders_over(MAX_MODULES_PER_FOLDER) == {"q_tuning/crowded": 13}
