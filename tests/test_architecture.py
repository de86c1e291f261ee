"""The architecture's rules, checked on the source (docs/architecture.md explains them):

- no module uses another module's underscore names (imports or attribute accesses; the few
  third-party private attributes we must touch are listed, each with its one home);
- folder rules: ``fused/`` (``veridical.kernels``) imports nothing of ours; ``decoding/`` imports neither the
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
            "fused": "veridical.kernels", "evals": "veridical.evals", "world": "veridical.world"}
# The top layer: command-line modules and the glue that wires the parts together; they may
# import anything, and only other top-layer modules import them.
APP_NAMES = {"cli", "score_cli", "bench", "demo", "__main__"}
APPS = {"veridical.evaluation"}
# Third-party private attributes we must touch: (module, attribute) -> why, one home each.
ALLOWED_PRIVATE = {
    ("veridical.decoding.attention", "_attn_implementation"):
        "transformers has no public getter for a config's attention implementation",
    ("veridical.vllm.plugin", "_processor_factory"):
        "vLLM keeps a model class's multimodal processor factories only there",
    ("veridical.vllm.plugin", "_call_hf_processor"):
        "vLLM's processors call the HF processor there; the branch's pixel transform follows it",
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
    if module in APPS or parts[-1] in APP_NAMES:
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
BASE = {"veridical.errors", "veridical.images", "veridical.cache", "veridical.provenance"}


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


# A method of each axis, written and registered here alone: adding one touches no engine file ----
def _axis_methods():
    import torch

    from veridical.decoding.attention import AttentionEdit
    from veridical.decoding.method import Branch, Method, Param, Request

    class NoImageBranch(Method):
        """Axis 1: a branch without the image whose logits replace the real ones."""

        name = "test_axis_branch"

        def branches(self):
            return [Branch("no_image", make=lambda r, rng: Request(None, r.prompt, r.system))]

        def delta(self, logits, branch_logits, step):
            return branch_logits["no_image"] - logits

    class HeadScale(AttentionEdit):
        calls = 0

        def __init__(self, layers, factor):
            self._layers, self.factor = set(layers), factor

        def layers(self):
            return self._layers

        def head_scale(self, layer, plan):
            HeadScale.calls += 1
            heads = 4  # tiny LLaVA's query heads
            return torch.full((len(plan.index), heads), self.factor)

    class ScaledHeads(Method):
        """Axis 2: every head's output scaled before o_proj."""

        name = "test_axis_edit"
        params = (Param("factor", 1.0, "head output factor", low=0.0),)

        def attention_edits(self, ctx):
            n_layers = len(ctx.adapter.decoder_layers(ctx.model))
            return [HeadScale(range(n_layers), self.args["factor"])]

    def plain_greedy(ctx, state, method, n_branches, config, seeds):
        logits, tokens = state.prefill(), [[] for _ in seeds]
        while True:
            chosen = ctx.scores(method, logits, len(seeds), state.info.names, len(tokens[0]))
            chosen = chosen.argmax(-1)
            for ids, token in zip(tokens, chosen.tolist()):
                if not ctx.finished(ids, config):
                    ids.append(token)
            if all(ctx.finished(ids, config) for ids in tokens):
                return [(ids, ctx.finished(ids, config)) for ids in tokens]
            logits = state.step(chosen.repeat(n_branches))

    class OwnSearch(Method):
        """Axis 3: a search of its own (plain greedy over the batch state)."""

        name = "test_axis_search"

        def search(self):
            return plain_greedy

    return NoImageBranch, ScaledHeads, HeadScale, OwnSearch


def test_a_method_of_each_axis_plugs_in_from_outside_the_package(images, prompts):
    from conftest import tiny_engine

    import veridical
    from veridical.decoding.registry import registered_for

    branch, edit, head_scale, search = _axis_methods()
    engine = tiny_engine("llava")
    base = engine.generate(images[:2], prompts[:2], max_new_tokens=5)
    with registered_for(branch, edit, search):
        assert {"test_axis_branch", "test_axis_edit", "test_axis_search"} <= {
            m["name"] for m in veridical.methods()}
        swapped = engine.generate(images[:2], prompts[:2], method="test_axis_branch",
                                  max_new_tokens=5)
        text_only = engine.generate([None, None], prompts[:2], max_new_tokens=5)
        assert [r.token_ids for r in swapped] == [r.token_ids for r in text_only]
        same = engine.generate(images[:2], prompts[:2], method="test_axis_edit",
                               max_new_tokens=5)
        assert head_scale.calls > 0
        assert [r.token_ids for r in same] == [r.token_ids for r in base]  # factor 1
        muted = engine.generate(images[:2], prompts[:2], method="test_axis_edit",
                                method_args={"factor": 0.0}, max_new_tokens=5)
        assert [r.token_ids for r in muted] != [r.token_ids for r in base]
        own = engine.generate(images[:2], prompts[:2], method="test_axis_search",
                              max_new_tokens=5)
        assert [r.token_ids for r in own] == [r.token_ids for r in base]
    # never listed outside the block (nor by production code that lists methods)
    assert not [m["name"] for m in veridical.methods() if m["name"].startswith("test_")]


def test_our_engine_is_a_backend_and_the_server_and_runner_need_no_more():
    from conftest import tiny_engine

    import veridical

    engine = tiny_engine("llava")
    assert isinstance(engine, veridical.Backend)
    members = {n for n in dir(veridical.Backend) if not n.startswith("_")}
    members |= set(veridical.Backend.__annotations__)
    used = set()
    for module in ("veridical.server.serving", "veridical.server.prompt",
                   "veridical.evals.runner"):
        for node in ast.walk(ast.parse(MODULES[module].read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                    and node.value.attr == "engine") or (
                    isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "engine"):
                used.add(node.attr)
    assert used - members <= {"context"}, used - members  # context(): optional token counting
