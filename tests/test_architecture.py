"""The shape of the code (issue 10): the domain package is split by pipeline stage with no import cycle, and its
top level stays small. Reads the source with ``ast`` (nothing is imported), so it runs anywhere in milliseconds."""

import ast
from pathlib import Path

LIB = Path(__file__).resolve().parents[1] / "apps" / "fetal_head" / "lib"
PACKAGE = LIB / "fetal_head"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(LIB).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_lines(tree: ast.AST) -> set:
    """Lines inside ``if TYPE_CHECKING:`` blocks: imports for annotations only, never executed."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(path: Path, modules: set) -> set:
    """Every module of ``modules`` that ``path`` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
            # `from pkg import submodule` imports the submodule (its package is already being imported)
            targets = submodules if len(submodules) == len(node.names) else [target] + submodules
        else:
            continue
        found.update(t for t in targets if t in modules and t != me)
    return found


def import_graph():
    paths = sorted(LIB.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_known_edges():
    graph = import_graph()
    assert "fetal_head.io.common" in graph["fetal_head.io.dicom_us"]
    assert "fetal_head.segmentation.predictor" in graph["fetal_head.segmentation.model_store"]
    # a function-level import counts too (that is how the old images <-> dicom_us cycle hid)
    assert "fetal_head.synthesis.realism" in graph["fetal_head.evaluation.benchmark"]


def test_no_import_cycle_in_the_app_library():
    assert cycles(import_graph()) == []


def test_cycle_detection_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_top_level_is_small_and_subpackages_say_what_they_own():
    top = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(top) <= 3, top
    for sub in (p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()):
        doc = ast.get_docstring(ast.parse((sub / "__init__.py").read_text()))
        assert doc and len(doc) > 40, f"{sub.name}/__init__.py needs a docstring saying what it owns"


def test_domain_package_does_not_import_the_server():
    """fetal_head works without MONAI Label's server: no module imports fastapi or monailabel at module level."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(n.split(".")[0] in ("fastapi", "monailabel") for n in names):
                    offenders.append(str(path.relative_to(LIB)))
    assert offenders == []
