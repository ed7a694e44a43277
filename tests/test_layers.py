"""The package's layers (docs/DESIGN.md, "Layers"): no module imports a layer above its own.

Every `import tinylm...` / `from tinylm... import` in tinylm/**.py counts, including the lazy
ones inside functions (the ones that slipped through before: the trainer reached up into
export/, the harness command into train/, the tokenizer command into data/). A parse of ~150
files with `ast`, no import of the package: well under a second.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tinylm"

# Lowest first. A module may import its own layer and the layers below it. The key is the
# module's first name under tinylm (a sub-package or a top-level module); `tinylm` itself is the
# package's `__init__.py` (the version).
LAYERS: list[set[str]] = [
    # 0 foundations: config tree, value domains, files, locks, signals, messages, error types
    {"tinylm", "paths", "fileio", "yamlio", "domains", "suggest", "locks", "interrupts"}
    | {"finite", "crash", "cli_args", "config", "errors", "tpu"},
    {"tokenizer"},  # 1
    {"data"},  # 2 sources, prepared shards, loaders, the tokenizer command (trains on sources)
    {"model", "cpu_attention", "cpu_embedding", "generate", "stops", "hf"},  # 3 the model, its
    # CPU attention and embedding backward, sampling, Hugging Face formats
    {"eval"},  # 4 evaluation of a model in memory (the harness command is handed the model)
    {"train", "preflight", "estimate"},  # 5 training, its checkpoints, planning a run
    {"export", "runs", "scaling", "sweep", "serve", "cli"},  # 6 applications over runs
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _key(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "tinylm"


def _module_name(path: Path, package: Path) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, imported tinylm module) for every import statement, at any depth."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "tinylm"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "tinylm":  # `from tinylm import data` imports the sub-package
                found += [(node.lineno, f"tinylm.{a.name}") for a in node.names]
            elif node.module.startswith("tinylm."):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level:
            found.append((node.lineno, "<relative>"))
    return found


def _violations(package: Path) -> list[str]:
    bad = []
    for path in sorted(package.rglob("*.py")):
        module = _module_name(path, package)
        if _key(module) not in LEVEL:
            bad.append(f"{module}: not in any layer (add it to LAYERS and docs/DESIGN.md)")
            continue
        for line, target in _imports(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(package.parent)}:{line}"
            if target == "<relative>":
                bad.append(f"{where}: relative import (write tinylm.... in full)")
            elif _key(target) not in LEVEL:
                if target.split(".")[1] != "__version__":
                    bad.append(f"{where}: imports {target}, which is in no layer")
            elif LEVEL[_key(target)] > LEVEL[_key(module)]:
                bad.append(
                    f"{where}: {module} (layer {LEVEL[_key(module)]}) imports {target} "
                    f"(layer {LEVEL[_key(target)]}), above it"
                )
    return bad


def test_no_import_runs_up_the_layers():
    assert _violations(PACKAGE) == []


def test_checker_sees_lazy_imports(tmp_path):
    """The check itself: an import inside a function, one layer up, is found (and a legal one not)."""
    pkg = tmp_path / "tinylm"
    (pkg / "tokenizer").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "tokenizer" / "__init__.py").write_text("")
    (pkg / "tokenizer" / "cli.py").write_text(
        "from tinylm.fileio import atomic_write_text\n\n"
        "def f():\n    from tinylm.data import train_bpe_on_sources\n"
    )
    assert _violations(pkg) == [
        "tinylm/tokenizer/cli.py:4: tinylm.tokenizer.cli (layer 1) imports tinylm.data (layer 2), above it"
    ]


@pytest.mark.parametrize("name", sorted(LEVEL))
def test_layers_name_real_modules(name):
    """Every name in LAYERS exists (a renamed module must not leave a stale, unchecked entry)."""
    if name == "tinylm":
        return
    assert (PACKAGE / f"{name}.py").is_file() or (PACKAGE / name / "__init__.py").is_file(), name
