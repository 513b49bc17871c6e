"""The import rules between the packages, read from the source with `ast`.

    llm2slm (CLI, client) ──> jobs ──> kd.config
    serve_app ──────────────> jobs
    train_job ──────────────> jobs, kd
    kd ──> torch (never Ray, never the contract's storage)

Every import statement counts, including the ones inside functions: a lazy import is
still an arrow between the packages.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> module prefixes it must never import
FORBIDDEN = {
    "kd": ("ray", "jobs.storage", "jobs.paths", "train_job", "serve_app", "llm2slm"),
    "jobs": ("torch", "ray", "train_job", "serve_app", "llm2slm"),
    "serve_app": ("train_job", "llm2slm"),
    "train_job": ("serve_app", "llm2slm"),
    "llm2slm": ("serve_app", "train_job", "torch", "ray"),
}


def imported_modules(path: Path) -> set[str]:
    """Every module named by an import statement of the file (absolute imports only)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def _hits(module: str, prefixes: tuple[str, ...]) -> list[str]:
    return [p for p in prefixes if module == p or module.startswith(p + ".")]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_follow_the_layers(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no modules under {package}/"
    problems = [
        f"{f.relative_to(ROOT)} imports {m}"
        for f in files
        for m in sorted(imported_modules(f))
        if _hits(m, FORBIDDEN[package])
    ]
    assert not problems, "\n".join(problems)


def test_kd_config_is_torch_free():
    """`jobs` imports kd.config; that must pull in neither torch nor anything heavy.
    kd.config is built from kd.spec (names, string forms) and kd.config_checks."""
    own = ("kd.config", "kd.config_checks", "kd.spec")
    files = ("kd/__init__.py", "kd/config.py", "kd/config_checks.py", "kd/spec.py", "kd/fmt.py")
    for name in files:
        mods = imported_modules(ROOT / name)
        assert not [m for m in mods if m.split(".")[0] in ("torch", "ray", "transformers")], name
        others = [m for m in mods if m.startswith("kd.") and not _hits(m, own)]
        assert not others, (name, others)


def test_preflight_is_torch_free():
    """The API runs kd.preflight before queueing: it reads files, never torch or Ray."""
    own = ("kd.config", "kd.spec", "kd.preflight", "kd.model_files", "kd.memory_plan", "kd.names")
    for name in ("kd/preflight.py", "kd/model_files.py", "kd/memory_plan.py", "kd/names.py"):
        mods = imported_modules(ROOT / name)
        assert not [m for m in mods if m.split(".")[0] in ("torch", "ray", "transformers")], name
        assert all(_hits(m, own) for m in mods if m.startswith("kd.")), (name, mods)


def test_the_rules_see_lazy_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from serve_app.app import app_builder\n    import torch.nn\n")
    assert {"serve_app.app", "serve_app.app.app_builder", "torch.nn"} <= imported_modules(src)


def test_serve_app_and_jobs_use_only_the_torch_free_part_of_kd():
    """The API process and the contract never load torch through kd."""
    allowed = (
        "kd.config",
        "kd.fmt",
        "kd.preflight",
        "kd.model_files",
        "kd.memory_plan",
        "kd.names",
    )
    for package in ("serve_app", "jobs"):
        for f in sorted((ROOT / package).rglob("*.py")):
            kd_mods = [m for m in imported_modules(f) if m == "kd" or m.startswith("kd.")]
            assert all(_hits(m, allowed) for m in kd_mods), (str(f.relative_to(ROOT)), kd_mods)


def test_no_kd_function_is_over_60_lines():
    """#15: small functions in kd/ (a declarative config class is not a function)."""
    long = []
    for path in sorted((ROOT / "kd").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines})")
    assert not long, "split these functions: " + ", ".join(long)
