"""The floors of DESIGN.md section 4, read from the import graph: no module imports one above
its floor, at module level or inside a function, and only the runtime and jobs/ import Ray."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Module prefix -> floor (the longest prefix wins). Floor 0 is what every floor may use.
FLOORS = {
    "condense": 0,
    "condense.errors": 0,
    "condense.strict": 0,
    "condense.schema": 0,
    "condense.faults": 0,
    "condense.cores": 1,
    "condense.storage": 2,
    "condense.runtime": 3,
    "condense.readers": 4,
    "condense.synth": 4,
    "condense.stages": 5,
    "condense.train": 5,
    "condense.config": 6,
    "condense.pipeline": 6,
    "condense.demo": 6,
    "condense.cli": 6,
    "jobs": 6,
}
NAMES = {0: "base", 1: "cores", 2: "storage", 3: "runtime", 4: "readers", 5: "stages", 6: "top"}
RAY_ALLOWED = ("condense.runtime", "jobs")


def floor(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in FLOORS:
            return FLOORS[prefix]
    raise KeyError(module)


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted((REPO / "condense").rglob("*.py")) + sorted((REPO / "jobs").glob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported module) of every import in the file, wherever it is."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from condense import schema`: the names may be modules themselves
            found += [
                (node.lineno, f"{target}.{a.name}") for a in node.names if target == "condense"
            ]
    return found


def test_no_module_imports_a_floor_above_its_own():
    wrong = []
    for module, path in modules().items():
        own = floor(module)
        for line, target in imports(path, module):
            if not (target == "condense" or target.startswith(("condense.", "jobs."))):
                continue
            if floor(target) > own:
                wrong.append(
                    f"{path.relative_to(REPO)}:{line}: {module} ({NAMES[own]}) imports "
                    f"{target} ({NAMES[floor(target)]})"
                )
    assert not wrong, "upward imports:\n" + "\n".join(wrong)


def test_only_the_runtime_and_jobs_import_ray():
    wrong = [
        f"{path.relative_to(REPO)}:{line}: {module} imports {target}"
        for module, path in modules().items()
        if not module.startswith(RAY_ALLOWED)
        for line, target in imports(path, module)
        if target == "ray" or target.startswith("ray.")
    ]
    assert not wrong, "Ray outside the runtime:\n" + "\n".join(wrong)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The graph reader finds imports inside functions and relative ones (it can fail)."""
    path = tmp_path / "x.py"
    path.write_text(
        "def f():\n    from condense.pipeline import runner\nfrom ..stages import base\n"
    )
    found = imports(path, "condense.cores.x")
    assert (2, "condense.pipeline") in found
    assert (3, "condense.stages") in found
    assert floor("condense.pipeline.runner") > floor("condense.cores.x")


FORMATS = ("pyarrow.parquet", "pyarrow.ipc")  # the run directory's file formats: storage's own


def test_stages_and_the_pipeline_read_and_write_through_storage():
    wrong = [
        f"{path.relative_to(REPO)}:{line}: {module} imports {target}"
        for module, path in modules().items()
        if module.startswith(("condense.stages", "condense.pipeline"))
        for line, target in imports(path, module)
        if target in FORMATS
    ]
    assert not wrong, "file formats outside storage/:\n" + "\n".join(wrong)
