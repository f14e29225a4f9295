"""The library's functions stay short enough to read whole: each one over the limit is named."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("refinery", "serving", "training", "evaluation")
# About one screen. A longer function is doing several things that each deserve a name (and a
# test of their own); the house aim is 60, the limit leaves room for a long signature or docstring.
MAX_FUNCTION_LINES = 80


def function_lengths(path: Path) -> list[tuple[int, int, str]]:
    """(lines, first line, qualified name) of every function and method in ``path``,
    nested ones included; lines count from ``def`` (decorators excluded) to the last line."""
    found: list[tuple[int, int, str]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                assert child.end_lineno is not None
                name = f"{prefix}{child.name}"
                found.append((child.end_lineno - child.lineno + 1, child.lineno, name))
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text(), filename=str(path)), "")
    return found


def test_function_lengths_are_measured_from_def_to_the_last_line(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "class A:\n"
        "    @staticmethod\n"
        "    def f():\n"
        "        def g():\n"
        "            return 1\n"
        "        return g\n"
        "\n"
        "async def h():\n"
        "    pass\n"
    )
    assert sorted(function_lengths(sample)) == [(2, 4, "A.f.g"), (2, 8, "h"), (4, 3, "A.f")]


def test_no_library_function_is_longer_than_the_limit() -> None:
    files = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    assert len(files) > 50, f"found only {len(files)} files under {PACKAGES} in {ROOT}"
    too_long = [
        f"{path.relative_to(ROOT)}:{line} {name} ({lines} lines)"
        for path in files
        for lines, line, name in function_lengths(path)
        if lines > MAX_FUNCTION_LINES
    ]
    assert not too_long, (
        f"functions over {MAX_FUNCTION_LINES} lines; split them into named helpers:\n"
        + "\n".join(too_long)
    )
