"""The import layers of ``pbnn/``: a module imports only from its own layer or lower ones.

Read bottom-up: core (model, priors, likelihoods, potential, data, options) -> kernels (pure
algorithms) -> engine (optimiser loop, chain runner, seeding, distributed) -> posterior
(Posterior, Prediction, approximations, ArviZ I/O, diagnostics) -> infer (the backends) ->
api (``pbnn.fit``) -> evaluation (metrics, calibration, plots) -> apps (bench, CLI, demo).
The Posterior sits below the backends because it is what every backend returns.
Deferred imports inside functions count too: they hide a cycle, they do not remove it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pbnn

LAYERS = ["core", "kernels", "engine", "posterior", "infer", "api", "evaluation", "apps"]
ROOT = Path(pbnn.__file__).parent


def _layer(module: str) -> int | None:
    """Layer index of ``pbnn.<package>...``; None for the package root and outside modules."""
    parts = module.split(".")
    if parts[0] != "pbnn" or len(parts) < 2:
        return None
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else None


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            if node.module == "pbnn":  # `from pbnn import infer` imports pbnn.infer
                out += [(node.lineno, f"pbnn.{a.name}") for a in node.names]
    return out


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        if name != "pbnn":
            yield name, path


def test_every_module_sits_in_a_layer():
    unplaced = [name for name, _ in _modules() if _layer(name) is None]
    assert not unplaced, f"modules outside the layers {LAYERS}: {unplaced}"


def test_no_import_runs_back_up_the_layers():
    violations = []
    for name, path in _modules():
        mine = _layer(name)
        for line, target in _imports(path):
            if target == "pbnn":
                violations.append(f"{name}:{line} imports the package root (import the module it needs)")
                continue
            theirs = _layer(target)
            if theirs is not None and theirs > mine:
                violations.append(f"{name}:{line} ({LAYERS[mine]}) imports {target} ({LAYERS[theirs]})")
    assert not violations, "imports that run back up the layers:\n" + "\n".join(violations)


def test_backends_do_not_import_each_other_or_arviz():
    backends = {cls.__module__ for cls in pbnn.infer.BACKENDS.values()}
    problems = []
    for name, path in _modules():
        if not name.startswith("pbnn.infer.") or name == "pbnn.infer":
            continue
        for line, target in _imports(path):
            if target.split(".")[0] == "arviz":
                problems.append(f"{name}:{line} imports arviz")
            if target in backends and target != name:
                problems.append(f"{name}:{line} imports the backend module {target}")
    assert not problems, "\n".join(problems)
