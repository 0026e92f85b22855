"""The library's layout, enforced: layers, one name per meaning, no hidden global reseeding.

- ``dlarch_lib/core`` (runtime, hardware, data, text, train, measure, viz, notebook) imports no
  chapter module; a chapter module imports the core and modules of *earlier* chapters only
  (``dlarch_lib.CHAPTER_OF``), so a reader meets every piece before it is used;
- the library imports no test or site plumbing (pytest, nbval, myst-nb only lazily in ``glue``);
- a top-level name is defined in one module only: two functions with one name are two meanings;
- no library function reseeds a global random generator (``torch.manual_seed``, ``np.random.seed``,
  ``random.seed``): randomness comes from a ``torch.Generator`` the caller passes or from
  ``runtime.seeded``, which restores the caller's state. Only ``runtime`` may touch the seeds.
"""

from __future__ import annotations

import ast
import collections
import importlib
import pathlib

import pytest

import dlarch_lib

LIB = pathlib.Path(dlarch_lib.__file__).parent
CORE = {p.stem for p in (LIB / "core").glob("*.py") if p.stem != "__init__"}
CHAPTER_MODULES = {p.stem for p in LIB.glob("*.py") if p.stem != "__init__"}
TYPE_VARIABLES = {"T"}  # a one-letter TypeVar per generic module is not a twin


def _tree(path: pathlib.Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _imported_modules(path: pathlib.Path) -> set[str]:
    """Every ``dlarch_lib`` module ``path`` imports (``core.x`` for the core), at any depth."""
    found: set[str] = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dlarch_lib"):
            parts = node.module.split(".")[1:]
            if not parts:  # from dlarch_lib import a, b
                found |= {alias.name for alias in node.names}
            elif parts[0] == "core":
                found |= {f"core.{parts[1]}"} if len(parts) > 1 else {f"core.{a.name}" for a in node.names}
            else:
                found.add(parts[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("dlarch_lib."):
                    parts = alias.name.split(".")[1:]
                    found.add(".".join(parts[:2]) if parts[0] == "core" else parts[0])
    return found


def test_every_chapter_module_has_a_chapter_and_the_table_is_complete():
    assert set(dlarch_lib.CHAPTER_OF) == CHAPTER_MODULES, "dlarch_lib.CHAPTER_OF must list every chapter module"
    assert all(1 <= c <= 30 for c in dlarch_lib.CHAPTER_OF.values())
    for module in CHAPTER_MODULES | {f"core.{m}" for m in CORE}:
        importlib.import_module(f"dlarch_lib.{module}")
        assert f"dlarch_lib.{module}" in (dlarch_lib.__doc__ or ""), f"the package docstring's table misses {module}"


@pytest.mark.parametrize("module", sorted(CORE))
def test_the_core_imports_no_chapter_module(module):
    imported = _imported_modules(LIB / "core" / f"{module}.py")
    chapters = {m for m in imported if not m.startswith("core.")}
    assert not chapters, f"dlarch_lib.core.{module} imports chapter modules {sorted(chapters)}"


@pytest.mark.parametrize("module", sorted(CHAPTER_MODULES))
def test_a_chapter_module_imports_only_the_core_and_earlier_chapters(module):
    own = dlarch_lib.CHAPTER_OF[module]
    for other in _imported_modules(LIB / f"{module}.py"):
        if other.startswith("core."):
            continue
        assert other in dlarch_lib.CHAPTER_OF, f"{module} imports unknown module {other}"
        assert dlarch_lib.CHAPTER_OF[other] <= own, (
            f"{module} (chapter {own}) imports {other} (chapter {dlarch_lib.CHAPTER_OF[other]}), a later chapter"
        )


def test_the_library_holds_no_test_or_site_plumbing():
    for path in LIB.rglob("*.py"):
        for node in ast.walk(_tree(path)):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                root = name.split(".")[0]
                assert root not in {"pytest", "nbval", "nbclient", "jupyter_cache"}, f"{path.name} imports {name}"


def test_one_meaning_per_name():
    where = collections.defaultdict(list)
    for path in LIB.rglob("*.py"):
        for node in _tree(path).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names = [node.target.id]
            else:
                names = []
            for name in names:
                if name not in TYPE_VARIABLES and not name.startswith("__"):
                    where[name].append(str(path.relative_to(LIB)))
    twins = {name: paths for name, paths in where.items() if len(paths) > 1}
    assert not twins, f"names defined in more than one module (import the one instead): {twins}"


SEEDING_CALLS = {
    ("torch", "manual_seed"),
    ("torch", "seed"),
    ("random", "seed"),
    ("np.random", "seed"),
    ("numpy.random", "seed"),
    ("torch.random", "manual_seed"),
    ("torch.cuda", "manual_seed"),
    ("torch.cuda", "manual_seed_all"),
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def test_no_library_function_reseeds_a_global_generator():
    offenders = []
    for path in LIB.rglob("*.py"):
        if path.name == "runtime.py":
            continue
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if (_dotted(node.func.value), node.func.attr) in SEEDING_CALLS:
                    offenders.append(f"{path.relative_to(LIB)}:{node.lineno}")
    assert not offenders, f"global reseeding (use a torch.Generator or runtime.seeded): {offenders}"


@pytest.mark.parametrize(
    "build",
    [
        lambda: __import__("dlarch_lib.pipeline", fromlist=["x"]).block_stack(width=8, depth=2, seed=3),
        lambda: __import__("dlarch_lib.parallel", fromlist=["x"]).DDPJob(hidden=8).initial_model(),
        lambda: __import__("dlarch_lib.complexity", fromlist=["x"]).book_models(vocab_size=11, device="cpu")[
            "GPT (ch. 6)"
        ][0],
    ],
    ids=["pipeline.block_stack", "parallel.DDPJob.initial_model", "complexity.book_models"],
)
def test_seeded_library_calls_leave_the_callers_generator_alone(build):
    """A library function that owns its seed builds the same weights every call, and the caller's
    random stream continues after it exactly as if it had not been called."""
    import torch

    torch.manual_seed(5)
    expected = torch.rand(4)  # the caller's next draw, without the library call
    torch.manual_seed(5)
    first = [p.detach().clone() for p in build().parameters()]
    assert torch.equal(torch.rand(4), expected), "the library call moved the caller's random stream"
    torch.manual_seed(123)  # whatever the caller's state, the function's own seed decides the weights
    assert all(torch.equal(a, b) for a, b in zip(first, build().parameters()))
