"""Check the package layout: no import cycles, no oversized modules, no private name borrowed from another
module, harness folders importing one way only, and `__main__` only in real entry points.

    python scripts/check_layout.py            # prints the module graph's cycles (none expected) and file sizes
    python scripts/check_layout.py --max-lines 650

Reads the source with `ast` (nothing is imported), counting every `import` and `from ... import` of a project
module, including the ones inside functions (a lazy import still ties two modules together). Importing a
package's parent (`estimator/__init__.py`) is implicit in Python and is not an edge here. A private name is one
with a leading underscore that is not a dunder (`_fail`, not `__version__`); borrowing one means `from m import
_name`, or `m._name` where `m` is a project module bound by an import. Exit 1 on a cycle, a module over the line
limit, a borrowed private name, an import against the harness's folder order (LAYERS), an import between the
harness and the estimator, or a contract module that imports anything but the standard library and the contract.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("contract", "harness", "estimator")
# The two halves meet only through results files and the contract beneath both: neither imports the other.
HALVES = ("harness", "estimator")
# What each harness folder may import of the others (its own folder and the package root always): run data at the
# bottom, then telemetry, then the engine, the drivers, the experiments, and the CLI on top.
LAYERS = {
    "harness.rundata": set(),
    "harness.telemetry": set(),
    "harness.engine": {"harness.rundata", "harness.telemetry"},
    "harness.drivers": {"harness.rundata", "harness.telemetry", "harness.engine"},
    "harness.experiments": {"harness.rundata", "harness.telemetry", "harness.engine", "harness.drivers"},
    "harness.cli": {"harness.rundata", "harness.telemetry", "harness.engine", "harness.drivers",
                    "harness.experiments"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that `path` imports (`from a.b import c` counts a.b.c when c is a module, else a.b)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        out.update(n for n in names if n in modules and n != me)
    return out


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def borrowed_privates(path: Path, modules: dict[str, Path]) -> list[str]:
    """`module: name` for each private name of another project module that `path` imports or reads."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    bound: dict[str, str] = {}  # local name -> project module it stands for
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in modules:
                    bound[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for a in node.names:
                if f"{base}.{a.name}" in modules:
                    bound[a.asname or a.name] = f"{base}.{a.name}"
                elif base in modules and base != me and _private(a.name):
                    found.append(f"{base}: {a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            target = ast.unparse(node.value)
            mod = bound.get(target) or (target if target in modules else None)
            if mod is not None and mod != me:
                found.append(f"{mod}: {node.attr}")
    return sorted(set(found))


def layer_of(module: str) -> str | None:
    return next((layer for layer in LAYERS if module == layer or module.startswith(layer + ".")), None)


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """`a -> b` for each import from one harness folder into a folder it may not import (LAYERS)."""
    bad = []
    for module, targets in sorted(graph.items()):
        mine = layer_of(module)
        if mine is None:
            continue
        for target in sorted(targets):
            theirs = layer_of(target)
            if theirs is not None and theirs != mine and theirs not in LAYERS[mine]:
                bad.append(f"{module} -> {target}")
    return bad


def top_level_imports(path: Path) -> set[str]:
    """The top-level names of every absolute import in `path` (`numpy` for `import numpy.linalg`)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def contract_violations(modules: dict[str, Path]) -> list[str]:
    """`module -> name` for each import of a contract module outside the standard library and the contract."""
    allowed = set(sys.stdlib_module_names) | {"contract", "__future__"}
    return [
        f"{m} -> {name}"
        for m, p in sorted(modules.items())
        if m == "contract" or m.startswith("contract.")
        for name in sorted(top_level_imports(p) - allowed)
    ]


def halves_crossed(graph: dict[str, set[str]]) -> list[str]:
    """`a -> b` for each import from one half (harness, estimator) into the other."""
    return [
        f"{m} -> {t}"
        for m, targets in sorted(graph.items())
        for t in sorted(targets)
        if m.split(".")[0] in HALVES and t.split(".")[0] in HALVES and m.split(".")[0] != t.split(".")[0]
    ]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
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
                comp = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def main_guards(modules: dict[str, Path]) -> list[str]:
    """Modules with an `if __name__ == "__main__":` block (entry points should be `__main__.py` or the CLI)."""
    return [m for m, p in modules.items() if '__name__ == "__main__"' in p.read_text(encoding="utf-8")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-lines", type=int, default=600, help="largest module allowed (lines)")
    args = ap.parse_args(argv)
    modules = project_modules()
    graph = {m: imports_of(p, modules) for m, p in modules.items()}
    bad = 0
    found = cycles(graph)
    for comp in found:
        print("import cycle: " + " <-> ".join(comp))
        bad += 1
    if not found:
        edges = sum(len(v) for v in graph.values())
        print(f"no import cycles: {len(modules)} modules, {edges} import edges in {', '.join(PACKAGES)}")
    for p in sorted(modules.values()):
        n = len(p.read_text(encoding="utf-8").splitlines())
        if n > args.max_lines:
            print(f"too long: {p.relative_to(ROOT)} has {n} lines (limit {args.max_lines})")
            bad += 1
    borrowed = [(m, item) for m, p in sorted(modules.items()) for item in borrowed_privates(p, modules)]
    for m, item in borrowed:
        print(f"private name borrowed: {m} uses {item}")
    against = layer_violations(graph)
    for edge in against:
        print(f"import against the folder order: {edge}")
    crossed = halves_crossed(graph)
    for edge in crossed:
        print(f"import between the harness and the estimator: {edge}")
    impure = contract_violations(modules)
    for edge in impure:
        print(f"contract imports beyond the standard library: {edge}")
    if not borrowed and not against:
        print("no private name borrowed across modules; harness folders import one way "
              "(rundata, telemetry < engine < drivers < experiments < cli)")
    if not crossed and not impure:
        print("harness and estimator meet only through contract (standard library only) and results files")
    bad += len(borrowed) + len(against) + len(crossed) + len(impure)
    print("__main__ blocks: " + (", ".join(main_guards(modules)) or "none"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
