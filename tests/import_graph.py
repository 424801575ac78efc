"""The modules a source file imports, read from its import statements (for the layering tests).

Read from the source (every import statement, top-level or inside a function), not from
`sys.modules`: third-party packages may load what they like (DeepSpeed itself imports MLflow).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository: `cmoe/` and `flows/` are packages below it


def imported_modules(source: Path) -> set[str]:
    """Full dotted name of every module an `import` / `from … import` of `source` names; relative ones resolved."""
    package = source.resolve().relative_to(ROOT).parent.parts  # a file's package; for __init__.py its own
    names = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            names.add(".".join([*base, *([node.module] if node.module else [])]))
    return names
