"""The package's structure, read from the source (AST, every import including function-local ones):

- the layers, lowest first: a module imports only modules of its own layer and below, so what is generic never
  reaches for a stage, and a stage never for a later one (the stages after training never import the trainer);
- no circle of imports between modules, and no clipgen module imported by a name computed at run time;
- each on-disk format has one owner: no other module spells its file names;
- no function longer than 80 lines; the linter is clean; every ``protocol §N`` cited exists in docs/protocol.md.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import clipgen

PACKAGE = Path(clipgen.__file__).parent
REPO = PACKAGE.parent

# Lowest first; a unit is a subpackage of clipgen or a module of its top level.
LAYERS = (
    ("core", ("conf", "resources", "errors", "facts", "files", "hashing", "provenance", "procs",
              "forkserver_preload", "config", "stats")),
    ("places", ("layout", "rundir", "runlock", "recipedir", "wandb_run")),
    ("world and models", ("world", "models")),
    ("config checks", ("preflight",)),
    ("data", ("data",)),
    ("recipes", ("recipes",)),
    ("evaluation", ("eval",)),
    ("training", ("train",)),
    ("after training", ("analyze", "diff", "export")),
    ("report", ("report",)),
    ("launch", ("launch", "sweep")),
    ("entry points", ("cli",)),
)
LEVEL = {unit: i for i, (_, units) in enumerate(LAYERS) for unit in units}

# File names of the on-disk formats, each spelled by its owner only (clipgen/FORMATS.md).
OWNERS = {
    "manifest.json": "recipedir.py", "sizes.json": "recipedir.py",
    "meta.json": "rundir.py", "config.yaml": "rundir.py", "latest.pt": "rundir.py", "results.jsonl": "rundir.py",
    "zeroshot_head.json": "rundir.py",
    "image_embeddings": "eval/outputs.py",  # an evaluation output's key (a head's output of that name elsewhere)
}
# Modules where an owned name means something else: the model heads return a dict with an "image_embeddings" entry
# (what eval/outputs.py then stores).
OTHER_MEANING = {"image_embeddings": ("models/zeroshot.py", "models/supervised.py", "models/kinds.py")}


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


def _unit(path: Path, root: Path) -> str:
    return path.relative_to(root).with_suffix("").parts[0]  # a subpackage's name, or a top-level module's


def _unit_of(name: str, root: Path) -> str | None:
    parts = name.split(".")
    if len(parts) < 2 or parts[0] != root.name:
        return None
    return parts[1] if (root / parts[1]).is_dir() or (root / f"{parts[1]}.py").is_file() else None


def layer_violations(root: Path = PACKAGE, level: dict = LEVEL) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        unit = _unit(path, root)
        if unit == "__init__":
            continue
        if unit not in level:
            found.append(f"{path.relative_to(root.parent)} is in no layer: add {unit!r} to LAYERS")
            continue
        for line, name in imports(path, root):
            other = _unit_of(name, root)
            if other and other != unit and level.get(other, -1) > level[unit]:
                found.append(f"{path.relative_to(root.parent)}:{line} imports {name} (layer "
                             f"{LAYERS[level[other]][0]!r} is above {unit}'s, {LAYERS[level[unit]][0]!r})")
    return sorted(set(found))


def _module_graph(root: Path) -> dict[str, set[str]]:
    modules = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for _, target in imports(path, root):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target not in (name, root.name):
                graph[name].add(target)
    return graph


def import_cycles(root: Path = PACKAGE) -> list[list[str]]:
    """The circles of imports between modules (strongly connected components of more than one module)."""
    graph, index, low, stack, on, out = _module_graph(root), {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


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


PATH_CALLS = {"open", "Path", "read_json", "joinpath", "glob", "rglob", "get", "load", "with_name"}


def _path_or_key_strings(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants used as a path or a key: an operand of ``/``, a subscript, a dict key, an operand of a
    comparison, or an argument of a call that opens, joins, globs or reads (open, Path, read_json, joinpath, ...).
    Messages that name a file for the user are not such uses."""
    parent = {id(c): n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}
    out = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            continue
        up = parent.get(id(node))
        while isinstance(up, ast.JoinedStr | ast.FormattedValue):  # an f-string part: judge the f-string
            up = parent.get(id(up))
        func = getattr(up, "func", None)
        called = getattr(func, "attr", None) or getattr(func, "id", None)
        if (isinstance(up, ast.BinOp) and isinstance(up.op, ast.Div)) or isinstance(up, ast.Subscript | ast.Compare) \
                or (isinstance(up, ast.Dict) and any(k is node for k in up.keys)) \
                or (isinstance(up, ast.Call) and called in PATH_CALLS):
            out.append((node.lineno, node.value))
    return out


def spelled_outside_owner(root: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        for line, text in _path_or_key_strings(ast.parse(path.read_text(), str(path))):
            for name, owner in OWNERS.items():
                if name in text and rel != owner and rel not in OTHER_MEANING.get(name, ()):
                    found.append(f"{root.name}/{rel}:{line} spells {name!r} (owner: {root.name}/{owner})")
    return found


def long_functions(root: Path = PACKAGE, limit: int = 80) -> list[str]:
    return [f"{p.relative_to(root.parent)}:{n.lineno} {n.name} has {n.end_lineno - n.lineno + 1} lines"
            for p in sorted(root.rglob("*.py")) for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > limit]


def protocol_sections(text: str) -> set[str]:
    """'N' for every '## N.' heading of docs/protocol.md and 'N.M' for every numbered item or '### N.M' heading
    under it."""
    out, current = set(), None
    for line in text.splitlines():
        head = re.match(r"^## (\d+)\.", line)
        sub = re.match(r"^(?:### \d+\.(\d+)|(\d+)\. )", line)
        if head:
            current = head.group(1)
            out.add(current)
        elif sub and current:
            out.add(f"{current}.{sub.group(1) or sub.group(2)}")
    return out


def dangling_citations(repo: Path = REPO) -> list[str]:
    sections = protocol_sections((repo / "docs" / "protocol.md").read_text())
    found = []
    files = [*sorted((repo / "clipgen").rglob("*.py")), *sorted((repo / "benchmarks").glob("*.py")),
             *sorted((repo / "tests").glob("*.py")), repo / "README.md", *sorted((repo / "docs").glob("*.md")),
             repo / "clipgen" / "FORMATS.md"]
    for path in files:
        text = path.read_text()
        for m in re.finditer(r"protocol\s+§\s*(\d+(?:\.\d+)?)", text):
            if m.group(1) not in sections:
                line = text.count("\n", 0, m.start()) + 1
                found.append(f"{path.relative_to(repo)}:{line} cites protocol §{m.group(1)}, which "
                             "docs/protocol.md does not have")
    return found


def test_each_module_imports_only_its_own_layer_and_below():
    bad = layer_violations()
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_no_circle_of_imports():
    assert not import_cycles()


def test_no_clipgen_module_is_imported_by_a_computed_name():
    bad = dynamic_imports()
    assert not bad, "imports hidden from the layer rules:\n" + "\n".join(bad)


def test_file_names_of_each_format_only_in_their_owner():
    bad = spelled_outside_owner()
    assert not bad, "\n".join(bad)


def test_no_function_over_80_lines():
    bad = long_functions()
    assert not bad, "\n".join(bad)


def test_every_protocol_citation_exists():
    bad = dangling_citations()
    assert not bad, "\n".join(bad)


def test_the_linter_is_clean():
    """ruff with pyflakes and pycodestyle (pyproject.toml [tool.ruff])."""
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "clipgen", "tests", "benchmarks"],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-1000:]


def test_the_checks_see_what_they_should(tmp_path):
    """The checkers themselves, on a small package: a function-local import of a higher layer, a relative import
    of the trainer, a circle, an importlib call, an owned file name outside its owner (not in a docstring), a
    citation of a section that does not exist."""
    pkg = tmp_path / "clipgen"
    for sub in ("eval", "models", "train"):
        (pkg / sub).mkdir(parents=True)
    (pkg / "eval" / "x.py").write_text("def f():\n    from clipgen import train\n")
    (pkg / "eval" / "y.py").write_text("from ..train import loop\n")
    (pkg / "train" / "loop.py").write_text("from clipgen.models import z\n")
    (pkg / "models" / "z.py").write_text('"""meta.json in a docstring is fine, so is a message."""\n'
                                         'import importlib\n\n\ndef g(n, d):\n    print(f"no meta.json in {d}")\n'
                                         '    return importlib.import_module(n) or d / "meta.json"\n')
    (pkg / "models" / "w.py").write_text("from clipgen.models import v\n")
    (pkg / "models" / "v.py").write_text("from clipgen.models import w\n")
    assert layer_violations(pkg) == [
        "clipgen/eval/x.py:2 imports clipgen.train (layer 'training' is above eval's, 'evaluation')",
        "clipgen/eval/y.py:1 imports clipgen.train (layer 'training' is above eval's, 'evaluation')",
        "clipgen/eval/y.py:1 imports clipgen.train.loop (layer 'training' is above eval's, 'evaluation')"]
    assert import_cycles(pkg) == [["clipgen.models.v", "clipgen.models.w"]]
    assert dynamic_imports(pkg) == ["clipgen/models/z.py:7 calls import_module(n)"]
    assert spelled_outside_owner(pkg) == ["clipgen/models/z.py:7 spells 'meta.json' (owner: clipgen/rundir.py)"]
    assert protocol_sections("## 2. Data\n1. world\n2. DomainNet\n## 3. Captions\n### 3.1 Terms\n") == \
        {"2", "2.1", "2.2", "3", "3.1"}
