"""The package's layers, read from the source (AST, every import including function-local ones): the stages after
training never import the trainer, the model layer imports no stage, and no clipgen module is imported by a name
computed at run time (``importlib.import_module``), so every arrow between modules is visible in an import."""
from __future__ import annotations

import ast
from pathlib import Path

import clipgen

PACKAGE = Path(clipgen.__file__).parent
STAGES = ("train", "eval", "export", "analyze", "diff", "report", "launch", "recipes")
# importer (a package, or a module of the top level) -> packages it must not import
FORBIDDEN = {**{p: ("train",) for p in ("eval", "export", "analyze", "diff", "report", "recipes", "data", "world",
                                         "preflight")},
             "models": STAGES}


def imports(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every import in ``path`` (a file under the package folder ``root``);
    ``from a import b`` counts as ``a.b`` too, so ``from clipgen import train`` is an import of ``clipgen.train``;
    relative imports are resolved against the file's package."""
    package = list(path.parent.relative_to(root.parent).parts)
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            out += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return out


def _layer(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("").parts
    return rel[0]  # a subpackage's name, or a top-level module's (preflight, cli, ...)


def _in(name: str, package: str) -> bool:
    return name == f"clipgen.{package}" or name.startswith(f"clipgen.{package}.")


def layer_violations(root: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        layer = _layer(path, root)
        for line, name in imports(path, root):
            banned = [p for p in FORBIDDEN.get(layer, ()) if _in(name, p)]
            if banned:
                found.append(f"{path.relative_to(root.parent)}:{line} imports {name} (clipgen.{layer} must not "
                             f"import clipgen.{banned[0]})")
    return found


def dynamic_imports(root: Path = PACKAGE) -> list[str]:
    """Calls of ``importlib.import_module`` / ``__import__`` whose argument is not a literal naming a module
    outside clipgen."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            called = (f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else "")
            if called not in ("import_module", "__import__"):
                continue
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and not arg.value.startswith("clipgen"):
                continue  # a third-party module named literally
            what = ast.unparse(arg) if arg is not None else ""
            found.append(f"{path.relative_to(root.parent)}:{node.lineno} calls {called}({what})")
    return found


def test_stages_after_training_and_the_model_layer_import_no_stage_above_them():
    bad = layer_violations()
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_no_clipgen_module_is_imported_by_a_computed_name():
    bad = dynamic_imports()
    assert not bad, "imports hidden from the layer rules:\n" + "\n".join(bad)


def test_the_layer_check_sees_function_local_and_from_imports(tmp_path):
    """The checker itself: a function-local ``from clipgen import train`` in eval, a relative import of the
    trainer and an importlib call in models are all reported with their file and line."""
    pkg = tmp_path / "clipgen"
    (pkg / "eval").mkdir(parents=True)
    (pkg / "models").mkdir()
    (pkg / "eval" / "x.py").write_text("def f():\n    from clipgen import train\n")
    (pkg / "eval" / "y.py").write_text("from ..train import loop\n")
    (pkg / "models" / "z.py").write_text("import importlib\n\n\ndef g(n):\n    return importlib.import_module(n)\n")
    (pkg / "preflight.py").write_text("import os\n")  # allowed
    assert layer_violations(pkg) == [
        "clipgen/eval/x.py:2 imports clipgen.train (clipgen.eval must not import clipgen.train)",
        "clipgen/eval/y.py:1 imports clipgen.train (clipgen.eval must not import clipgen.train)",
        "clipgen/eval/y.py:1 imports clipgen.train.loop (clipgen.eval must not import clipgen.train)"]
    assert dynamic_imports(pkg) == ["clipgen/models/z.py:5 calls import_module(n)"]
