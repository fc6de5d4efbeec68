#!/usr/bin/env python3
"""Import cycles between the top-level modules of each crate.

Reads every `crate::<module>` path (in `use` lines and inline) of each Rust file under
`<crate>/src`, maps files to their top-level module (`src/gateway/catalog.rs` is part of
`gateway`; `lib.rs` and `main.rs` are the crate root, which may import anything), and prints
each strongly connected component of more than one module.

Exit status: 0 when the cycles found are exactly those listed in `.ci/cycles-allowed` (a
ratchet while the restructuring lands: a cycle may only disappear, and then must be removed
from the list); 1 when there is a new or grown cycle, or a listed one is gone.

Usage: python3 .ci/cycles.py [--list]   (--list: print the graph's cycles and exit 0)
"""

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
CRATES = ["protocol", "queries", "node"]
CRATE_PATH = re.compile(r"\bcrate::([a-z_][a-z0-9_]*)")
# `use crate::{a, b::c}` names several modules at once.
CRATE_GROUP = re.compile(r"\bcrate::\{([^}]*)\}", re.S)
COMMENT = re.compile(r"//.*?$", re.M)


def module_of(src: pathlib.Path, file: pathlib.Path):
    rel = file.relative_to(src)
    if rel.parts == ("lib.rs",) or rel.parts == ("main.rs",):
        return None
    return rel.parts[0].removesuffix(".rs")


def graph(crate: str):
    src = ROOT / crate / "src"
    edges = {}
    for file in sorted(src.rglob("*.rs")):
        module = module_of(src, file)
        if module is None:
            continue
        text = COMMENT.sub("", file.read_text(encoding="utf-8"))
        # Test modules may reach anywhere (they are not part of the layering).
        text = text.split("#[cfg(test)]\nmod tests", 1)[0]
        targets = set(CRATE_PATH.findall(text))
        for group in CRATE_GROUP.findall(text):
            for item in group.split(","):
                name = item.strip().split("::")[0].strip()
                if re.fullmatch(r"[a-z_][a-z0-9_]*", name):
                    targets.add(name)
        targets.discard(module)
        targets = {t for t in targets if (src / f"{t}.rs").exists() or (src / t).is_dir()}
        edges.setdefault(module, set()).update(targets)
    return edges


def cycles(edges):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def main():
    found = []
    for crate in CRATES:
        edges = graph(crate)
        for c in cycles(edges):
            members = set(c)
            arrows = sorted(
                f"{a} -> {b}" for a in c for b in sorted(edges.get(a, ())) if b in members
            )
            found.append((crate, " ".join(c), arrows))
    if "--list" in sys.argv:
        for crate, members, arrows in found:
            print(f"{crate}: {members}\n    " + "\n    ".join(arrows))
        print(f"{len(found)} cycle(s)")
        return 0
    allowed_file = ROOT / ".ci" / "cycles-allowed"
    allowed = set()
    if allowed_file.exists():
        for line in allowed_file.read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                allowed.add(line)
    now = {f"{crate}: {members}" for crate, members, _ in found}
    bad = False
    for crate, members, arrows in found:
        key = f"{crate}: {members}"
        if key not in allowed:
            bad = True
            print(f"new import cycle in {crate}: {members}\n    " + "\n    ".join(arrows))
    for key in sorted(allowed - now):
        bad = True
        print(f"cycle gone (remove it from .ci/cycles-allowed): {key}")
    if not bad:
        print(f"import cycles: {len(now)} (all listed in .ci/cycles-allowed)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
