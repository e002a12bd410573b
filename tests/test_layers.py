"""The package's layers import downward only (docs/architecture.md): parse every module's imports, in
functions too, and fail on an edge that goes up or sideways between `train` and `infer`."""

import ast
from pathlib import Path

import vlmkit

ROOT = Path(vlmkit.__file__).parent

# lowest first; a module may import its own package (same folder) and any lower layer
LAYERS = [
    {"vlmkit.errors"},
    {"vlmkit.io", "vlmkit.registry"},
    {"vlmkit.device", "vlmkit.config"},
    {"vlmkit.model"},
    {"vlmkit.data"},
    {"vlmkit.retrieval"},
    {"vlmkit.recipe"},
    {"vlmkit.build"},
    {"vlmkit.train", "vlmkit.infer", "vlmkit.export"},
    {"vlmkit.eval"},
    {"vlmkit.inspect", "vlmkit.quickstart", "vlmkit.ui"},
    {"vlmkit.serve", "vlmkit.distill"},
    {"vlmkit.cli", "vlmkit"},
    {"vlmkit.__main__"},
]


def unit(module: str) -> str:
    """The layer unit a module belongs to: its package under vlmkit (vlmkit.model.vlm -> vlmkit.model)."""
    parts = module.split(".")
    return ".".join(parts[:2])


def rank(module: str) -> int:
    name = unit(module)
    for i, layer in enumerate(LAYERS):
        if name in layer:
            return i
    raise AssertionError(f"{module}: in no layer; add it to LAYERS (and docs/architecture.md)")


def modules():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vlmkit" and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "vlmkit")
    return found


def test_every_import_goes_down():
    upward = []
    for name, path in modules():
        for dep in imports_of(path):
            if unit(dep) == unit(name) or (name == "vlmkit" and dep.startswith("vlmkit.")):
                continue
            if name == "vlmkit.cli" and dep == "vlmkit":  # the package's version string
                continue
            if rank(dep) >= rank(name):
                upward.append(f"{path.relative_to(ROOT.parent)} imports {dep}")
    assert not upward, "imports that do not go down a layer:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    """The parser finds imports inside functions, which is where the upward ones used to hide."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from vlmkit.train.loop import train\n")
    assert imports_of(source) == {"vlmkit.train.loop"}
    assert rank("vlmkit.train.loop") > rank("vlmkit.model.vlm")
