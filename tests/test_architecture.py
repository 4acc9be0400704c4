"""The shape of edge_agent/, read from its source (stdlib `ast`; nothing is imported): which
package may import which, who alone imports an outside library, and no import circles.

Every import counts: at the top, inside functions, under TYPE_CHECKING. A module importing
itself (the inference worker does, to pickle under its import name) is no circle.
`python tests/test_architecture.py` prints the figures: modules per package, import levels
(the longest chain of imports), circles.
"""

from __future__ import annotations

import ast
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "edge_agent"

# Lowest first. A module may import its own group, and any group of a lower layer; never a
# group of a higher layer, nor another group of its own layer.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("edge_agent", "edge_agent.errors", "edge_agent.log", "edge_agent.backoff", "edge_agent.hardware"),
    ("edge_agent.protocol",),
    ("edge_agent.settings",),
    ("edge_agent.mqtt", "edge_agent.delivery", "edge_agent.cameras", "edge_agent.inference"),
    ("edge_agent.health",),
    ("edge_agent.work",),
    ("edge_agent.automation",),
    ("edge_agent.daemon",),
    ("edge_agent.cli",),
    ("edge_agent.__main__",),
)
BASE = LAYERS[0]  # top-level modules: they import each other freely
# Outside library -> the only package (prefix) that may import it.
OWNERS = {"paho": "edge_agent.mqtt", "sqlite3": "edge_agent.delivery", "cv2": "edge_agent.cameras",
          "onnxruntime_genai": "edge_agent.inference.child"}
PROTOCOL_MAY_IMPORT = ("edge_agent.protocol", "edge_agent.errors")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module: an edge_agent module, or an outside top-level name
    line: int

    def __str__(self) -> str:
        return f"{self.source} (line {self.line}) imports {self.target}"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _imports_of(name: str, path: Path, known: dict[str, Path]) -> list[Import]:
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(name, _resolve(alias.name, known), node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package this module is in
                anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:  # `from package import name`: name may be a submodule
                dotted = f"{base}.{alias.name}"
                found.append(Import(name, _resolve(dotted if dotted in known else base, known), node.lineno))
    return list(dict.fromkeys(found))  # `from x import a, b`: one import of x


def _resolve(dotted: str, known: dict[str, Path]) -> str:
    """The edge_agent module an import loads (the longest known prefix), else the outside
    library's top-level name."""
    if dotted.split(".")[0] != PACKAGE:
        return dotted.split(".")[0]
    while dotted not in known and "." in dotted:
        dotted = dotted.rsplit(".", 1)[0]
    return dotted


def read_imports() -> tuple[dict[str, Path], list[Import]]:
    known = read_modules()
    return known, [imp for name, path in known.items() for imp in _imports_of(name, path, known)]


MODULES, IMPORTS = read_imports()


def inside(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def group_of(module: str) -> str | None:
    """The entry of LAYERS a module belongs to (the longest that contains it)."""
    groups = [g for layer in LAYERS for g in layer if inside(module, g) and (g != PACKAGE or module == PACKAGE)]
    return max(groups, key=len, default=None)


def layer_of(group: str) -> int:
    return next(n for n, layer in enumerate(LAYERS) if group in layer)


def internal_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for imp in IMPORTS:
        if imp.target in MODULES and imp.target != imp.source:
            graph[imp.source].add(imp.target)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components, iteratively; each component a list of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete circle per component of more than one module: a -> b -> ... -> a."""
    found = []
    for component in strongly_connected(graph):
        if len(component) < 2:
            continue
        start, members = component[0], set(component)
        paths = {child: [start, child] for child in graph[start] if child in members}
        queue = list(paths)
        while start not in paths:  # breadth first, back to start, inside the component
            node = queue.pop(0)
            for child in sorted(graph[node] & members):
                if child not in paths:
                    paths[child] = [*paths[node], child]
                    queue.append(child)
        found.append(paths[start])
    return found


def longest_chain(graph: dict[str, set[str]]) -> list[str]:
    """The longest import chain, over the components (a circle counts as one step)."""
    components = strongly_connected(graph)  # Tarjan: a component comes after all it imports
    component_of = {m: n for n, comp in enumerate(components) for m in comp}
    best: dict[int, list[str]] = {}
    for n, comp in enumerate(components):
        below = [best[component_of[t]] for m in comp for t in graph[m] if component_of[t] != n]
        best[n] = [comp[0], *max(below, key=len, default=[])]
    return max(best.values(), key=len, default=[])


# --- the rules ---------------------------------------------------------------------------------
def test_every_module_has_a_layer() -> None:
    assert [m for m in MODULES if group_of(m) is None] == [], "add it to LAYERS"


def test_protocol_imports_only_itself_and_errors() -> None:
    bad = [str(imp) for imp in IMPORTS if inside(imp.source, "edge_agent.protocol")
           and inside(imp.target, PACKAGE) and not any(inside(imp.target, ok) for ok in PROTOCOL_MAY_IMPORT)]
    assert bad == [], "protocol/ is pure: " + "; ".join(bad)


@pytest.mark.parametrize("library", sorted(OWNERS))
def test_one_owner_per_outside_library(library: str) -> None:
    bad = [str(imp) for imp in IMPORTS if imp.target == library and not inside(imp.source, OWNERS[library])]
    assert bad == [], f"only {OWNERS[library]} imports {library}: " + "; ".join(bad)


def test_no_package_imports_one_above_or_beside_it() -> None:
    bad = []
    for imp in IMPORTS:
        if imp.target not in MODULES:
            continue
        source, target = group_of(imp.source), group_of(imp.target)
        if source is None or target is None or source == target or (source in BASE and target in BASE):
            continue
        if layer_of(target) > layer_of(source):
            bad.append(f"{imp} (layer {layer_of(target)} above {layer_of(source)})")
        elif layer_of(target) == layer_of(source):
            bad.append(f"{imp} ({target} is beside {source})")
    assert bad == [], "imports against the layers:\n" + "\n".join(bad)


def test_no_import_circles() -> None:
    found = circles(internal_graph())
    assert found == [], "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


# --- the figures -------------------------------------------------------------------------------
def figures() -> str:
    graph = internal_graph()
    per_group = Counter(group_of(m) or "?" for m in MODULES)
    chain = longest_chain(graph)
    found = circles(graph)
    lines = [f"{len(MODULES)} modules, {sum(len(t) for t in graph.values())} imports between them"]
    lines += [f"  {group.removeprefix('edge_agent.') or group}: {count}"
              for layer in LAYERS for group in layer if (count := per_group[group])]
    lines.append(f"import levels (longest chain): {len(chain)}: {' -> '.join(chain)}")
    lines.append(f"circles: {len(found)}")
    lines += [f"  {' -> '.join(c)}" for c in found]
    return "\n".join(lines)


if __name__ == "__main__":
    print(figures())
