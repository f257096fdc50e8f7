"""The import graph runs one way (STYLE.md §5 and §9, issue 16).

Every import of a project module is an arrow, whether it sits at the top of
a file or inside a function: an in-function import written to dodge a cycle
is still a cycle. The rules are the data just below.
"""

import ast
import collections
import os

import pytest

from conftest import REPO_ROOT

# Top-level packages, and the ones each may import: train -> pipelines -> keras_resnext.
MAY_IMPORT = {
    "train": {"train", "pipelines", "keras_resnext"},
    "pipelines": {"pipelines", "keras_resnext"},
    "keras_resnext": {"keras_resnext"},
}

# keras_resnext's TensorFlow-only parts (a name covers its submodules).
# Everything else in keras_resnext is backend-neutral: it imports, and builds
# a model, where TensorFlow isn't installed.
TF_ONLY = (
    "keras_resnext.kernels",
    "keras_resnext.training",
    "keras_resnext.export",
    "keras_resnext.predict",
)

# The TensorFlow-only part neutral modules may import when they load: layers
# dispatch into the kernels on TensorFlow, and the kernels import TensorFlow
# only when called (test_neutral_modules_import_without_tensorflow holds them
# to that). The rest of TF_ONLY a neutral module may reach only from inside a
# function, as `kr.export_saved_model` does.
NEUTRAL_MAY_LOAD = ("keras_resnext.kernels",)

# The kernels are the floor: besides each other they may use only the
# pure-Python image helpers (normalisation, eval transforms), nothing that
# builds on them (layers, blocks, models, weights, applications, training...).
KERNELS = "keras_resnext.kernels"
KERNELS_MAY_IMPORT = ("keras_resnext.kernels", "keras_resnext.preprocessing",
                      "keras_resnext.transforms")

Edge = collections.namedtuple("Edge", "importer imported line in_function")


def within(module, names):
    return any(module == name or module.startswith(name + ".") for name in names)


def project_modules(root=REPO_ROOT, packages=tuple(MAY_IMPORT)):
    """{dotted module name: file path} for every .py file under `packages`."""
    modules = {}
    for package in packages:
        for folder, _, files in os.walk(os.path.join(root, package)):
            for file in files:
                if file.endswith(".py"):
                    path = os.path.join(folder, file)
                    parts = os.path.relpath(path, root)[: -len(".py")].split(os.sep)
                    if parts[-1] == "__init__":
                        parts.pop()
                    modules[".".join(parts)] = path
    return modules


def _resolve(name, modules):
    """The module `name` loads: itself, or the package defining it when it is
    an attribute (`from keras_resnext import build` is keras_resnext)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imported_names(node, importer, is_package):
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = importer if is_package else importer.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    # `from package import name` loads package.name when that is a submodule.
    return [f"{base}.{alias.name}" for alias in node.names]


def import_edges(modules):
    edges = []
    for importer, path in sorted(modules.items()):
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        is_package = path.endswith("__init__.py")
        functions = [n for n in ast.walk(tree)
                     if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
        in_function = {id(n) for f in functions for n in ast.walk(f) if n is not f}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for name in _imported_names(node, importer, is_package):
                imported = _resolve(name, modules)
                if imported and imported != importer:
                    edges.append(Edge(importer, imported, node.lineno, id(node) in in_function))
    return edges


def cyclic_groups(graph):
    """The strongly connected groups of `graph` ({node: successors}) that hold
    a cycle, each as a sorted list (Tarjan's algorithm)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def connect(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph.get(node, ()):
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            group = set()
            while node not in group:
                group.add(stack.pop())
            on_stack.difference_update(group)
            if len(group) > 1 or node in graph.get(node, ()):
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(groups)


def shortest_cycle(graph, group):
    """A shortest cycle inside `group`, from its first node back to it."""
    start = group[0]
    paths = collections.deque([[start]])
    while paths:
        path = paths.popleft()
        successors = sorted(set(graph.get(path[-1], ())) & set(group))
        if start in successors:
            return path
        paths.extend(path + [s] for s in successors if s not in path)


def describe(edge):
    where = "in a function" if edge.in_function else "at import"
    return f"{edge.importer} imports {edge.imported} ({where}, line {edge.line})"


def test_cycle_finder_finds_a_cycle_and_only_cycles():
    graph = {"a": {"b", "d"}, "b": {"c"}, "c": {"a", "d"}, "d": {"b"}, "e": {"a", "e"}, "f": set()}
    assert cyclic_groups(graph) == [["a", "b", "c", "d"], ["e"]]
    assert shortest_cycle(graph, ["a", "b", "c", "d"]) == ["a", "b", "c"]
    assert shortest_cycle(graph, ["e"]) == ["e"]
    assert cyclic_groups({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_imports_resolve_to_the_module_they_load(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from pkg import low\nname = 1\n")
    (package / "low.py").write_text("def f():\n    from pkg import name\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "leaf.py").write_text("from .. import low\nfrom . import other\n")
    (package / "sub" / "other.py").write_text("import pkg.sub.leaf as leaf\n")
    modules = project_modules(str(tmp_path), ("pkg",))
    assert {(e.importer, e.imported, e.in_function) for e in import_edges(modules)} == {
        ("pkg", "pkg.low", False),
        ("pkg.low", "pkg", True),  # an attribute of pkg: its __init__ runs
        ("pkg.sub.leaf", "pkg.low", False),
        ("pkg.sub.leaf", "pkg.sub.other", False),
        ("pkg.sub.other", "pkg.sub.leaf", False),
    }


@pytest.fixture(scope="module")
def edges():
    return import_edges(project_modules())


def test_the_rules_name_modules_that_exist():
    modules = project_modules()
    missing = sorted({name for name in TF_ONLY + KERNELS_MAY_IMPORT
                      if not any(within(module, [name]) for module in modules)})
    assert not missing, f"the rules name modules that don't exist: {missing}"


def test_project_imports_have_no_cycle(edges):
    graph = collections.defaultdict(set)
    for edge in edges:
        graph[edge.importer].add(edge.imported)
    lines = {(e.importer, e.imported): e for e in edges}
    problems = []
    for group in cyclic_groups(graph):
        cycle = shortest_cycle(graph, group)
        steps = zip(cycle, cycle[1:] + cycle[:1])
        problems.append(f"{', '.join(group)} import each other, e.g. "
                        + "; ".join(describe(lines[step]) for step in steps))
    assert not problems, "\n".join(problems)


def layering_problems(edges):
    problems = []
    for edge in edges:
        importer_package = edge.importer.partition(".")[0]
        if edge.imported.partition(".")[0] not in MAY_IMPORT[importer_package]:
            problems.append(f"{describe(edge)}: {importer_package} may import only "
                            f"{sorted(MAY_IMPORT[importer_package])}")
        elif within(edge.importer, [KERNELS]) and not within(edge.imported, KERNELS_MAY_IMPORT):
            problems.append(f"{describe(edge)}: the kernels may import only {KERNELS_MAY_IMPORT}")
        elif (edge.importer.startswith("keras_resnext") and not within(edge.importer, TF_ONLY)
              and not edge.in_function and within(edge.imported, TF_ONLY)
              and not within(edge.imported, NEUTRAL_MAY_LOAD)):
            problems.append(f"{describe(edge)}: a backend-neutral module loads a "
                            f"TensorFlow-only one")
    return problems


def test_imports_point_down_the_layers(edges):
    problems = layering_problems(edges)
    assert not problems, "\n".join(problems)


def test_layering_rules_catch_upward_imports():
    upward = [Edge("keras_resnext.models", "pipelines.dataset", 3, True),
              Edge("pipelines.dataset", "train.common", 3, True),
              Edge("keras_resnext.kernels.tf_ops", "keras_resnext.layers", 3, True),
              Edge("keras_resnext.layers", "keras_resnext.training", 3, False)]
    allowed = [Edge("train.common", "pipelines", 3, False),
               Edge("keras_resnext.layers", "keras_resnext.kernels.tf_ops", 3, False),
               Edge("keras_resnext", "keras_resnext.export", 3, True),
               Edge("keras_resnext.export", "keras_resnext.applications", 3, False)]
    assert len(layering_problems(upward)) == len(upward)
    assert layering_problems(allowed) == []


NEUTRAL_IMPORT = """
import importlib, sys
sys.modules["tensorflow"] = None  # any import of TensorFlow now fails
import keras
assert keras.backend.backend() == "jax", keras.backend.backend()
import keras_resnext as kr
for name in {names!r}:
    importlib.import_module(name)
model = kr.ResNeXt29(depth=11, cardinality=2, width=4, classes=3, input_shape=(16, 16, 3))
print("built", model.count_params())
"""


def test_neutral_modules_import_without_tensorflow(python_subprocess):
    pytest.importorskip("jax")
    names = sorted(name for name in project_modules(packages=("keras_resnext",))
                   if not within(name, TF_ONLY))
    result = python_subprocess(NEUTRAL_IMPORT.format(names=names),
                               env={"KERAS_BACKEND": "jax"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "built" in result.stdout
