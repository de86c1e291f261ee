"""The architecture's rules, checked on the source (docs/architecture.md explains them):

- no module uses another module's underscore names (imports or attribute accesses; the few
  third-party private attributes we must touch are listed, each with its one home);
- folder rules: ``kernels/`` imports nothing of ours; ``decoding/`` imports neither the
  evaluation suite, the world, the server nor the CLI; ``heads/`` never imports ``evals/``;
  ``evals/`` and the server reach the engine only through the public API (``veridical``);
- no import cycles between folders.
"""

from __future__ import annotations

import ast
import collections
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"veridical": "veridical", "decoding": "veridical.decoding", "heads": "veridical.heads",
            "kernels": "veridical.kernels", "evals": "veridical.evals", "world": "veridical.world"}
APPS = {"veridical.cli", "veridical.demo", "veridical.bench", "veridical.__main__"}
# Third-party private attributes we must touch: (module, attribute) -> why, one home each.
ALLOWED_PRIVATE = {
    ("veridical.attention_impl", "_attn_implementation"):
        "transformers has no public getter for a config's attention implementation",
    ("veridical.decoding.state", "_prepare_position_ids_for_generation"):
        "the model's own position rule (Qwen's multimodal rope), as generate() uses it",
    ("veridical.cli", "_SubParsersAction"): "argparse's type of add_subparsers() results",
}


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts
                     if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


MODULES = modules()


def folder_of(module: str) -> str:
    """The node a module belongs to in the folder graph."""
    parts = module.split(".")
    if module == "veridical":
        return "api"
    if module in APPS:
        return "app"
    if len(parts) > 1 and parts[1] in ("decoding", "heads", "kernels", "evals", "world",
                                        "server"):
        return parts[1]
    return "core"  # veridical/*.py: loading, adapters, images, errors, ...


def imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) of every import in ``module``, at any
    depth (function-level imports count)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                if f"{target}.{alias.name}" in MODULES:
                    found.append((f"{target}.{alias.name}", None, node.lineno))
                else:
                    found.append((target, alias.name, node.lineno))
    return found


def ours(target: str) -> bool:
    return target in MODULES


def test_no_module_uses_another_modules_underscore_names():
    bad = []
    for module, path in MODULES.items():
        for target, name, line in imports(module):
            if ours(target) and name and name.startswith("_") and not name.startswith("__"):
                bad.append(f"{path.relative_to(ROOT)}:{line}: imports {target}.{name}")
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            if (module, node.attr) in ALLOWED_PRIVATE:
                continue
            bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: "
                       f"{ast.unparse(node.value)}.{node.attr}")
    assert not bad, "underscore names used across modules:\n" + "\n".join(bad)


def test_each_allowed_private_attribute_lives_in_its_one_home():
    for (module, attr), _why in ALLOWED_PRIVATE.items():
        assert module in MODULES, module
        assert f".{attr}" in MODULES[module].read_text(), (module, attr)


FORBIDDEN = {  # folder -> folders it must not import
    "kernels": {"api", "core", "app", "decoding", "heads", "evals", "world", "server"},
    "decoding": {"api", "app", "evals", "world", "server", "heads"},
    "heads": {"evals", "server", "app"},
    "evals": {"decoding", "heads", "kernels", "server", "app"},
    "server": {"decoding", "heads", "kernels", "evals", "world", "app"},
    "world": {"server", "app"},
    "core": {"app", "evals", "server"},
}
# modules of the core that a leaf may use (no imports of their own)
BASE = {"veridical.errors", "veridical.images"}


def folder_edges() -> dict[str, dict[str, list[str]]]:
    edges: dict[str, dict[str, list[str]]] = collections.defaultdict(dict)
    for module in MODULES:
        for target, _, line in imports(module):
            if not ours(target):
                continue
            a, b = folder_of(module), folder_of(target)
            if a != b and not (target in BASE and a != "kernels"):
                edges[a].setdefault(b, []).append(f"{module}:{line} -> {target}")
    return edges


def test_folder_rules():
    edges = folder_edges()
    bad = [f"{a} must not import {b}: {where[0]}"
           for a, targets in edges.items() for b, where in targets.items()
           if b in FORBIDDEN.get(a, set())]
    assert not bad, "\n".join(bad)


def test_no_import_cycles_between_folders():
    edges = folder_edges()
    graph = {a: set(t) for a, t in edges.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle.extend(path[path.index(nxt):] + [node, nxt] if nxt in path else
                             [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, path + [node]):
                return True
        state[node] = 2
        return False

    for node in sorted(graph):
        if state.get(node) is None and visit(node, []):
            break
    detail = {f"{a}->{b}": edges[a][b][0] for a, b in zip(cycle, cycle[1:]) if b in edges[a]}
    assert not cycle, f"import cycle between folders: {' -> '.join(cycle)}; {detail}"


def test_the_rules_catch_a_violation(tmp_path, monkeypatch):
    # a check that cannot fail is no check: a decoding module importing the eval suite and
    # another module's private name is caught
    bad = ROOT / "decoding" / "_architecture_probe.py"
    bad.write_text("from veridical.evals.runner import _check_images\n")
    try:
        MODULES["veridical.decoding._architecture_probe"] = bad
        edges = folder_edges()
        assert "evals" in edges["decoding"]
        found = [t for t in imports("veridical.decoding._architecture_probe")]
        assert ("veridical.evals.runner", "_check_images", 1) in found
    finally:
        del MODULES["veridical.decoding._architecture_probe"]
        bad.unlink()
