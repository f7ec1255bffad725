"""Print the README's Layout figure from the code: the layers of the import-linter contract
in pyproject.toml, each with its modules and the layers it imports (read by grimp).

    .venv/bin/python docs/layers.py   # tests/test_layout.py checks the README holds its output
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def layers() -> list[list[str]]:
    """The contract's layers, top first, each a list of sibling packages or modules."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    contract = next(c for c in config["contracts"] if c["type"] == "layers")
    return [[m.strip() for m in layer.split("|")] for layer in contract["layers"]]


def figure() -> str:
    """One line per layer: its members (with their modules) and what they import."""
    graph = grimp.build_graph("histosearch")
    stack = layers()
    owner = {m: i for i, layer in enumerate(stack) for m in layer}

    def short(module: str) -> str:
        return module.removeprefix("histosearch.")

    lines = []
    for i, layer in enumerate(stack):
        members = []
        for member in layer:
            children = sorted(short(c).split(".")[-1] for c in graph.find_children(member))
            members.append(short(member) + (f" ({', '.join(children)})" if children else ""))
        imported = set()
        for member in layer:
            for module in {member} | graph.find_descendants(member):
                for target in graph.find_modules_directly_imported_by(module):
                    top = next(
                        (m for m in owner if target == m or target.startswith(m + ".")), None
                    )
                    if top is not None and owner[top] != i:
                        imported.add(top)
        below = ", ".join(short(m) for m in owner if m in imported)
        lines.append(" | ".join(members))
        lines.append(f"    imports: {below}" if below else "    imports: nothing of histosearch")
    return "\n".join(lines)


if __name__ == "__main__":
    print(figure())
