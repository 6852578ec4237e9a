"""The house rules, checked on the source: no import circle, no function over 60 lines or with more than 7
parameters, and every config field read somewhere."""
import ast
import os
import dataclasses
import re
from pathlib import Path

from sgpo.config.schema import Config

SRC = Path(__file__).resolve().parents[1] / "src"
FILES = sorted((SRC / "sgpo").rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports, at module level or inside functions (relative imports resolved)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known and n != me}
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    known = {module_name(p) for p in FILES}
    assert cycles({module_name(p): imports(p, known) for p in FILES}) == []


def test_functions_are_short_and_take_few_parameters():
    bad = []
    for path in FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            a = node.args
            params = [*a.posonlyargs, *a.args, *a.kwonlyargs] + [x for x in (a.vararg, a.kwarg) if x]
            params = [p for p in params if p.arg not in ("self", "cls")]
            lines = node.end_lineno - node.lineno + 1
            if lines > 60 or len(params) > 7:
                bad.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}: {lines} lines, {len(params)} params")
    assert bad == []


def fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            yield from fields(f.default_factory, prefix + f.name + ".")
        else:
            yield prefix + f.name, f.name


def test_every_config_field_is_read_somewhere():
    text = "\n".join(p.read_text() for p in FILES)
    unread = [dotted for dotted, name in fields(Config) if not re.search(rf"\.{name}\b", text)]
    assert unread == []


def test_no_module_shadows_the_standard_library():
    """``vllm_worker.py`` runs as a script from its folder, whose modules then shadow the standard library's for
    vLLM (a ``profile.py`` beside it once broke torch's ``cProfile`` import in the worker); no module of the package
    takes a standard library name either."""
    import sys

    folder = Path(__file__).resolve().parents[1] / "src" / "sgpo"
    assert (folder / "generation" / "vllm_worker.py").exists()
    names = {p.stem for p in folder.rglob("*.py")} | {p.name for p in folder.rglob("*") if p.is_dir()}
    assert not names & set(sys.stdlib_module_names)


def test_deepspeed_is_told_the_cpu_on_a_machine_without_a_gpu():
    """transformers imports DeepSpeed (when installed) at every save; without ``DS_ACCELERATOR`` it warns in every
    process that it found no GPU. Loading sgpo's models module sets it on such a machine (a user's value stands)."""
    import subprocess
    import sys

    code = "import os, torch, sgpo.models.loading; print(os.environ.get('DS_ACCELERATOR'), torch.cuda.is_available())"
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.split()
    assert out == (["None", "True"] if out[-1] == "True" else ["cpu", "False"])
    env["DS_ACCELERATOR"] = "xpu"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.split()[0] == "xpu"


def test_the_package_is_rooms_each_saying_what_lives_in_it():
    """At most 8 modules at the top of ``src/sgpo`` (besides ``__init__``/``__main__``); every subpackage's
    ``__init__.py`` has a docstring saying what lives there and what it may import, and imports nothing (so importing
    one module of a room never runs another's)."""
    top = [p.name for p in (SRC / "sgpo").glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert len(top) <= 8, top
    for init in (SRC / "sgpo").glob("*/__init__.py"):
        tree = ast.parse(init.read_text())
        doc = ast.get_docstring(tree) or ""
        assert "import" in doc, f"{init}: the docstring says what the room may import"
        assert not [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
                    and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")], init
    rooms = {p.parent.name for p in (SRC / "sgpo").glob("*/*.py")}
    assert rooms <= {p.parent.name for p in (SRC / "sgpo").glob("*/__init__.py")}, "a folder without __init__.py"


def _allowed(doc: str, rooms: set[str]) -> set[str]:
    """The rooms (or ``room.module``s) a room's docstring says it may import."""
    rule = doc[doc.index("May import"):].split(".\n")[0].split('."')[0]
    if "nothing" in rule:
        return set()
    named = set(re.findall(r"``([\w.]+)``", rule))
    return rooms - named if "anything" in rule else named


def test_each_room_imports_only_what_its_docstring_allows():
    """The rooms' import rules (the last sentence of each ``__init__.py`` docstring) hold for every import of every
    module, at module level or inside a function."""
    rooms = {p.parent.name for p in (SRC / "sgpo").glob("*/__init__.py")}
    broken = []
    for room in sorted(rooms):
        allowed = _allowed(ast.get_docstring(ast.parse((SRC / "sgpo" / room / "__init__.py").read_text())), rooms)
        for path in (SRC / "sgpo" / room).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sgpo."):
                    target = node.module.split(".")[1:]
                    names = [".".join(target[:2])] + [f"{target[0]}.{a.name}" for a in node.names]
                    if target[0] != room and target[0] not in allowed and not set(names) & allowed:
                        broken.append(f"{path.relative_to(SRC)}:{node.lineno} imports {node.module}")
    assert broken == []


def test_the_vllm_worker_imports_nothing_of_sgpo():
    """``generation/vllm_worker.py`` runs by path in vLLM's own environment, where sgpo need not be installed."""
    tree = ast.parse((SRC / "sgpo" / "generation" / "vllm_worker.py").read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "." for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m.startswith(("sgpo", "."))], imported
