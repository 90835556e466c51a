"""The layers of the package: the math layer and the networks import without Lightning, Hydra, W&B or
torchmetrics, and no module imports a layer above its own."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

PKG = pathlib.Path(__file__).resolve().parents[1] / "sgm_lightning"

MATH_AND_NETS = [
    "sgm_lightning.sde", "sgm_lightning.sampling", "sgm_lightning.samplers", "sgm_lightning.likelihood",
    "sgm_lightning.losses", "sgm_lightning.score_matching", "sgm_lightning.parametrization", "sgm_lightning.analytic", "sgm_lightning.guidance",
    "sgm_lightning.inverse", "sgm_lightning.utils", "sgm_lightning.nets",
]
BLOCKED = ["lightning", "pytorch_lightning", "hydra", "omegaconf", "wandb", "torchmetrics", "torch_ema", "datasets"]


def test_math_layer_and_nets_import_without_the_training_stack():
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {BLOCKED!r}:
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
import importlib, pkgutil
import sgm_lightning.samplers, sgm_lightning.nets, sgm_lightning.inverse
mods = list({MATH_AND_NETS!r})
for pkg in (sgm_lightning.samplers, sgm_lightning.nets, sgm_lightning.inverse):
    mods += [pkg.__name__ + '.' + m.name for m in pkgutil.iter_modules(pkg.__path__)]
for m in mods:
    importlib.import_module(m)
bad = sorted(m for m in sys.modules if m.split('.')[0] in {BLOCKED!r})
assert not bad, bad
print(len(mods))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(PKG.parent))
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) >= len(MATH_AND_NETS)


def _layer(path: pathlib.Path) -> int:
    rel = path.relative_to(PKG).parts
    if rel[0] == "training":
        return 2
    if rel[0] == "evaluation":
        return 3
    if rel[0] in ("cli.py", "launch.py"):  # entry-point helpers
        return 4
    if rel[0] == "nets":
        return 1
    return 0  # math layer: top-level modules, samplers/, inverse/


def _module_layer(name: str) -> int | None:
    parts = name.split(".")
    if parts[0] != "sgm_lightning" or len(parts) < 2:
        return None
    return {"training": 2, "evaluation": 3, "cli": 4, "launch": 4, "nets": 1}.get(parts[1], 0)


def test_no_module_imports_a_higher_layer():
    offenders = []
    for path in PKG.rglob("*.py"):
        own = _layer(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                layer = _module_layer(name)
                # math 0 < nets 1 < training 2 < evaluation 3 < cli 4: only the own layer and those below
                if layer is not None and layer > own:
                    offenders.append(f"{path.relative_to(PKG)} imports {name}")
    assert not offenders, offenders
