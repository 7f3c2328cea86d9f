"""Check the package layout: no import cycles, no oversized modules, `__main__` only in real entry points.

    python scripts/check_layout.py            # prints the module graph's cycles (none expected) and file sizes
    python scripts/check_layout.py --max-lines 650

Reads the source with `ast` (nothing is imported), counting every `import` and `from ... import` of a project
module, including the ones inside functions (a lazy import still ties two modules together). Importing a
package's parent (`estimator/__init__.py`) is implicit in Python and is not an edge here. Exit 1 on a cycle or a
module over the line limit.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("harness", "estimator")


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
    ap.add_argument("--max-lines", type=int, default=650, help="largest module allowed (lines)")
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
    print("__main__ blocks: " + (", ".join(main_guards(modules)) or "none"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
