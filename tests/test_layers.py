"""The package's layers, bottom to top; a module may import from its own layer or below, never above.

The walk reads every module's imports with ``ast`` (function-level imports included), so a lazy import that
reaches upward fails as much as a top-level one."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "res2det"

# (layer, first component of the module path below ``res2det``)
LAYERS = [
    # plain types, images, config edits, loader, graceful stop on signals, what the machine is
    {"errors", "version", "structures", "images", "overrides", "loading", "interrupt", "machine"},
    {"ops"},  # detection ops (RoIAlign, NMS, deformable conv, Winograd), pure PyTorch
    {"models", "inference"},  # nn.Modules built from typed configs; the inference path their predict runs
    {"checkpoint", "pdparams", "fluid"},  # reading and writing weight files
    {"zoo"},  # named models, their published weights and key maps
    {"data", "evaluation", "deploy", "engine", "optimize", "visualize", "utils", "profiling"},
    {"cli", "__main__"},
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def _component(module: str) -> str | None:
    """``res2det.models.heads`` -> ``models``; the package itself (``res2det``) -> ``None``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute res2det module) for every import of res2det code in ``path``."""
    package = list(path.relative_to(PACKAGE.parent).parts[:-1])  # the module's package, e.g. res2det.models
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "res2det":
                continue
            if not node.module:  # ``from . import x``: each name is a module of that package
                out += [(node.lineno, f"{target}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, target))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "res2det"]
    return out


def test_every_module_has_a_layer():
    unknown = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in PACKAGE.rglob("*.py")} - set(LAYER_OF)
    assert unknown <= {"__init__"}, f"modules without a layer in this test: {sorted(unknown)}"


def test_no_import_reaches_a_higher_layer():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _component("res2det." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
        if own in (None, "__init__"):
            continue  # the package's own __init__ is the public top
        for line, target in _imports(path):
            dep = _component(target)
            if dep is None:
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports the package top ({target})")
            elif LAYER_OF.get(dep, -1) > LAYER_OF[own]:
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({own}, layer {LAYER_OF[own]}) imports "
                                  f"{target} (layer {LAYER_OF[dep]})")
    assert not violations, "imports from a higher layer:\n" + "\n".join(violations)


def _module_file(module: str) -> Path | None:
    """The file of ``res2det.a.b``: ``a/b.py`` or ``a/b/__init__.py``; None for a name inside a module."""
    rel = PACKAGE.joinpath(*module.split(".")[1:])
    for path in (rel.with_suffix(".py"), rel / "__init__.py"):
        if path.is_file():
            return path
    return None


def test_no_two_modules_import_each_other():
    """A pair of modules importing each other (lazily or not) is a circle: what both need goes below them."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        targets = set()
        for _, target in _imports(path):
            # ``from .pkg import name``: the name may be a module of that package, or a name in it
            found = _module_file(target) or _module_file(target.rsplit(".", 1)[0])
            if found is not None and found != path:
                targets.add(found)
        graph[path] = targets
    circles = sorted({tuple(sorted((str(a.relative_to(PACKAGE.parent)), str(b.relative_to(PACKAGE.parent)))))
                      for a, targets in graph.items() for b in targets if a in graph.get(b, ())})
    assert not circles, "modules importing each other: " + "; ".join(" <-> ".join(c) for c in circles)


def test_the_circle_check_sees_a_lazy_circle():
    first, second = PACKAGE / "ops" / "_circle_probe_a.py", PACKAGE / "ops" / "_circle_probe_b.py"
    first.write_text("from . import _circle_probe_b\n")
    second.write_text("def f():\n    from ._circle_probe_a import f\n")
    try:
        with pytest.raises(AssertionError, match="_circle_probe_a.py <-> res2det/ops/_circle_probe_b.py"):
            test_no_two_modules_import_each_other()
    finally:
        first.unlink()
        second.unlink()


def test_the_walk_sees_relative_and_lazy_imports():
    """The checker itself: a function-level relative import upward is caught."""
    fake = PACKAGE / "models" / "_layer_probe_tmp.py"
    fake.write_text("def f():\n    from ..zoo import create_model\n    return create_model\n")
    try:
        assert (2, "res2det.zoo") in _imports(fake)
    finally:
        fake.unlink()


@pytest.mark.slow
def test_predict_does_not_need_the_coco_toolkit():
    """``import res2det; create_model(...).predict(...)`` runs with pycocotools never imported."""
    code = ("import sys, numpy as np, res2det\n"
            "m = res2det.create_model('mask_rcnn_r2_tiny_fpn')\n"
            "(d,) = m.predict(np.zeros((64, 80, 3), np.uint8))\n"
            "assert d.width == 80 and d.height == 64\n"
            "assert 'pycocotools' not in sys.modules, 'pycocotools was imported'\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=PACKAGE.parent)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
