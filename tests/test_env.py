"""environment.yml's pip list and pyproject.toml's dependencies (+ the dev extra) must agree, and the
README's two set-up commands must be the ones .ci/run executes."""

from __future__ import annotations

import os
import re
import tomllib

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _norm(req: str) -> tuple[str, str]:
    """('torch-ema', '>=0.3') from 'torch_ema >= 0.3' (PEP 503 name normalisation, no spaces)."""
    m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(.*)", req)
    name = re.sub(r"[-_.]+", "-", m.group(1)).lower()
    return name, m.group(2).replace(" ", "")


def test_environment_yml_matches_pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    wanted = dict(_norm(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"])
    with open(os.path.join(ROOT, "environment.yml")) as f:
        env = yaml.safe_load(f)
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert dict(_norm(r) for r in pip) == wanted
    assert "python=3.11" in env["dependencies"]


def test_readme_commands_are_what_ci_runs():
    readme = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, flags=re.S)
    setup = [b.strip() for b in blocks[:2]]
    assert len(setup) == 2 and all("\n" not in s for s in setup)  # one line each
    assert "python train.py" in setup[0] and "WANDB_MODE=offline" in setup[0]
    assert setup[1].endswith("python -m pytest -q")
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert setup[1] in ci.splitlines()  # the same install + pytest line
    install = setup[1].rsplit("&&", 1)[0].strip()
    assert setup[0].startswith(install)  # both commands share the install
