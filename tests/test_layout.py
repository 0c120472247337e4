"""The package layout: each folder is one stage or one product, and imports between them only flow
downstream, never in a cycle.

The graph: every ``mmsr/**/*.py`` parsed with ``ast``, one edge per module-level import of another
mmsr module (``from mmsr.a import b`` is an import of ``mmsr.a.b`` when that is a module, else of
``mmsr.a``; a package's ``__init__`` that a submodule's import runs on the way is not an edge). Not
edges: imports under ``if TYPE_CHECKING:`` (annotations only), and imports inside functions, which run
when the function is called, after every module has loaded. These lazy imports are the allowed ones
(a new one is added here, with its reason):

- mmsr.callbacks.trajectory_logger -> mmsr.callbacks.wandb_table (wandb only when a WandbLogger is attached)
- mmsr.cli -> mmsr.callbacks.requeue, mmsr.callbacks.run_dir, mmsr.data.datamodule, mmsr.tools.secrets (Lightning only for ``fit``; the secrets' masking only for a failure's output: ``mmsr.tools`` loads PIL, numpy and imagehash, ~0.3 s of every command)
- mmsr.cli_checks -> mmsr.callbacks.final_checkpoint, mmsr.data.datamodule, mmsr.eval.load, mmsr.module, mmsr.optim, mmsr.tools.base, mmsr.tools.spec (the schedule's, the group size's and the tools' start-up checks, only for ``fit``)
- mmsr.data.loaders -> mmsr.data.hf (the optional ``datasets`` extra, for saved dataset directories)
- mmsr.demo.run -> mmsr.cli, mmsr.demo.world, mmsr.report.cli, mmsr.report.plots (the demo's stages, when they run)
- mmsr.eval.cli -> mmsr.data.loaders, mmsr.eval.load, mmsr.eval.run, mmsr.eval.suite, mmsr.eval.workflows, mmsr.reward.judge, mmsr.tools.base (after parsing)
- mmsr.eval.curate -> mmsr.data.loaders, mmsr.eval.cli, mmsr.prompt.render, mmsr.reward.mmsearch_r1, mmsr.rollout.engine (after parsing)
- mmsr.eval.load -> mmsr.checkpoint, mmsr.models.build, mmsr.module, mmsr.reward.judged, mmsr.rollout.hf_engine (no Lightning for a Hugging Face directory)
- mmsr.export -> mmsr.eval.load (after parsing)
- mmsr.plan -> mmsr.plan.config, mmsr.plan.memory (heavy imports after parsing)
- mmsr.plan.config -> mmsr.cli, mmsr.models.build, mmsr.module, mmsr.module_checks, mmsr.parallel, mmsr.rollout.loop, mmsr.sync (after parsing; the module to refuse other runs and run its checks, ``RolloutSettings``' ranges)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The stages in import order: a module may import its own layer and the layers before it (``checks``, the
# settings' range refusal, comes first: every layer checks its settings). The order is
# the data flow's (style guide: data -> prompt -> rollout -> tools -> reward -> algo -> module -> sync),
# with a called service ahead of its callers: the search tools (called from the rollout, whose results
# the prompt renders) before the prompt, the policy models (the rollout and the trainer feed them) before
# the rollout, weight sync before the module that calls it; the training side (``train``: batches and
# the PPO update), then the observers (``report`` reads records, ``callbacks`` write them), the Lightning
# modules, the command line and its commands, and the demo, a product that uses all of it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("checks", "data"),
    ("tools",),
    ("prompt",),
    ("models",),
    ("rollout",),
    ("reward",),
    ("algo",),
    ("checkpoint", "parallel", "reference", "optim", "metrics"),
    ("sync",),
    ("train",),
    ("report",),
    ("callbacks",),
    ("module_checks", "module_rewards", "module_validation"),
    ("module", "sft"),
    ("cli_errors", "cli_checks"),
    ("cli",),
    ("eval", "export", "plan", "sweep"),
    ("demo",),
    ("__main__",),
)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, name: str, modules: set[str]) -> tuple[set[str], set[str]]:
    """(module-level, lazy) mmsr modules ``path`` (module ``name``) imports; ``TYPE_CHECKING`` blocks skipped."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top, lazy = set(), set()

    def target(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    def visit(nodes, in_function: bool) -> None:
        for node in nodes:
            # ``if TYPE_CHECKING:`` only: its body never runs (``if not TYPE_CHECKING:`` always does)
            if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                visit(node.orelse, in_function)
                continue
            found: list[str] = []
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                found = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for dotted in found:
                if dotted.split(".")[0] == root_package and (t := target(dotted)) and t != name:
                    (lazy if in_function else top).add(t)
            inner = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            visit(ast.iter_child_nodes(node), inner)

    root_package = name.split(".")[0]
    visit(ast.parse(path.read_text(encoding="utf-8")).body, False)
    return top, lazy


def import_graph(package_dir: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module-level edges, lazy edges) between the modules of the package at ``package_dir``."""
    files = {module_name(p, package_dir.parent): p for p in sorted(package_dir.rglob("*.py"))}
    modules = set(files)
    graph = {name: imports(path, name, modules) for name, path in files.items()}
    return {m: e[0] for m, e in graph.items()}, {m: e[1] for m, e in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def stage(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


def layer(module: str) -> int:
    name = stage(module)
    return next(i for i, group in enumerate(LAYERS) if name in group)


MODULE_EDGES, LAZY_EDGES = import_graph(ROOT / "mmsr")


def all_edges(*graphs: dict[str, set[str]]):
    return sorted((a, b) for g in graphs for a, bs in g.items() for b in bs)


def test_the_checker_finds_cycles_and_skips_type_checking_and_lazy_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.b import B\n")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from .c import C\nB = 1\n")
    (pkg / "sub" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n\ndef f():\n    import pkg.a\nC = 1\n")
    edges, lazy = import_graph(pkg)
    assert edges["pkg.a"] == {"pkg.sub.b"} and edges["pkg.sub.b"] == {"pkg.sub.c"} and lazy["pkg.sub.c"] == {"pkg.a"}
    assert edges["pkg.sub"] == {"pkg.sub.b"} and find_cycle(edges) is None  # a package re-exporting is no cycle
    (pkg / "sub" / "c.py").write_text("from pkg.a import x\n")
    assert find_cycle(import_graph(pkg)[0]) == ["pkg.a", "pkg.sub.b", "pkg.sub.c", "pkg.a"]


def test_no_import_cycle_in_mmsr():
    assert len(MODULE_EDGES) > 80
    cycle = find_cycle(MODULE_EDGES)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_even_through_lazy_imports():
    """Not needed for imports to work, but a lazy import that closes a loop hides a layering mistake
    (``mmsr.data.loaders`` and ``mmsr.data.hf`` once imported each other)."""
    cycle = find_cycle({m: MODULE_EDGES[m] | LAZY_EDGES[m] for m in MODULE_EDGES})
    assert cycle is None, "import cycle through a lazy import: " + " -> ".join(cycle)


def test_lazy_imports_are_the_listed_ones():
    """A function-level import dodges the cycle check, so each one is listed (with its reason) above."""
    listed = set()
    for line in __doc__.splitlines():
        if line.startswith("- mmsr."):
            source, _, targets = line[2:].partition(" -> ")
            listed |= {(source, t) for t in targets.split(" (")[0].split(", ")}
    assert set(all_edges(LAZY_EDGES)) == listed


def test_every_stage_has_its_place():
    named = {n for group in LAYERS for n in group}
    assert {stage(m) for edge in all_edges(MODULE_EDGES, LAZY_EDGES) for m in edge} <= named


def test_imports_flow_downstream():
    upstream = [f"{a} -> {b}" for a, b in all_edges(MODULE_EDGES) if layer(b) > layer(a)]
    assert upstream == []


def test_report_does_not_import_callbacks():
    assert [(a, b) for a, b in all_edges(MODULE_EDGES, LAZY_EDGES) if stage(a) == "report" and stage(b) == "callbacks"] == []


def test_nothing_outside_the_demo_imports_it():
    """The trainer never imports the demo, not even lazily; the demo injects what it needs
    (``class_path`` entries: teacher, reading corpus, tokenizer scaffold)."""
    into = [(a, b) for a, b in all_edges(MODULE_EDGES, LAZY_EDGES) if stage(b) == "demo" and stage(a) != "demo"]
    assert into == []


@pytest.mark.parametrize(("old", "new"), [
    ("mmsr.teacher", "mmsr.demo.teacher"), ("mmsr.reading", "mmsr.demo.reading"),
    ("mmsr.worlds.shapes", "mmsr.demo.world"), ("mmsr.rollout.collate", "mmsr.train.batch"),
])  # fmt: skip
def test_moved_modules_name_their_new_place(old, new):
    import importlib

    with pytest.raises(ImportError, match=new.replace(".", r"\.")):
        importlib.import_module(old)


def _readme_tree() -> list[str]:
    """The lines of README's "Where things are" sketch (the first code block under that heading)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8").split("\n### Where things are\n", 1)[1]
    return text.split("```\n", 2)[1].splitlines()


def test_the_readme_sketch_names_every_folder_of_the_package_and_nothing_that_is_gone():
    """Every package folder of ``mmsr/`` (but the moved modules' shims, which only name the new place) is in the
    README's sketch, and every folder or file the sketch names at a line's start is there."""
    lines = _readme_tree()
    named = {word.strip("(),;") for line in lines for word in line.split() if word.strip("(),;").endswith("/")}
    packages = {f"{p.parent.name}/" for p in (ROOT / "mmsr").glob("*/__init__.py") if p.parent.name != "worlds"}
    assert packages - named == set()
    top = [line.split()[0] for line in lines[1:] if line and not line.startswith(" ")]
    inside = [line.split()[0] for line in lines if line.startswith("  ") and line[2] != " "]
    assert [t for t in top if not (ROOT / t).exists()] == []
    assert [t for t in inside if not (ROOT / "mmsr" / t).exists()] == []
