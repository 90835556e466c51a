"""Every ``python train.py ...`` / ``python sample.py ...`` command and every inline Hydra override of
README.md and docs/*.md composes with Hydra and its parts instantiate (no training, no download).

The commands are parsed from the documents themselves, so a renamed option, group or key breaks a test
here instead of the reader's copy-paste. Commands that need a GPU, several processes, a download or
the Inception weights still compose; only that part is not built."""

from __future__ import annotations

import functools
import glob
import inspect
import os
import re
import shlex

import pytest
import torch

from conftest import REPO, compose_config, load_script

DOCS = ["README.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))]
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_SPAN = re.compile(r"`([^`]+)`")  # a span may run over a line break (not a blank line)
_COMMAND = re.compile(r"\b(?:python|torchrun(?: --\S+)*) (train|sample)\.py\b")
_ASSIGN = re.compile(r'^([A-Za-z_]\w*)="([^"]*)"\s*$')


def _commands_in(text: str) -> list[tuple[str, str]]:
    """(script, argument string) of each ``python train.py|sample.py ...`` in ``text``: shell blocks with
    their line continuations joined and ``NAME="..."`` variables expanded, and inline code spans."""
    found = []
    for lang, body in _FENCE.findall(text):
        if lang not in ("bash", "sh", ""):
            continue
        env = {}
        for line in re.sub(r"\\\n\s*", " ", body).splitlines():
            m = _ASSIGN.match(line.strip())
            if m:
                env[m.group(1)] = m.group(2)
                continue
            m = _COMMAND.search(line)
            if m:
                rest = re.sub(r"\$(\w+)", lambda v: env.get(v.group(1), v.group(0)), line[m.end():])
                found.append((m.group(1), rest))
    prose = _FENCE.sub("", text)
    for span in _SPAN.findall(prose):
        m = _COMMAND.search(span)
        if m and "\n\n" not in span:
            found.append((m.group(1), span[m.end():]))
    return found


def _unique(params: list) -> list:
    """The first of each (config, overrides): a command repeated in another document is composed once."""
    seen, out = set(), []
    for p in params:  # hydra.* overrides (run dir) do not change the job's config
        key = (p.values[0], tuple(o for o in p.values[1] if not o.startswith("hydra.")))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def doc_commands() -> list:
    """pytest params (script, overrides), id ``<file>:<n>``, of every documented command."""
    params = []
    for name in DOCS:
        with open(os.path.join(REPO, name)) as f:
            text = f.read()
        for i, (script, args) in enumerate(_commands_in(text)):
            args = re.sub(r"<[^<>]*>", "X", args)  # placeholders: ckpt_path=<sr3 run>/checkpoints/last.ckpt
            overrides = shlex.split(args, comments=True)
            params.append(pytest.param(script, overrides, id=f"{name}:{i}:{script}"))
    return _unique(params)


COMMANDS = doc_commands()
_TOKEN = re.compile(r"^[+~]?([A-Za-z_]\w*)(?:\.[\w<>]+)*(?:=(.*))?$")


def _top_keys(config: str) -> set:
    """The top-level keys of ``configs/<config>.yaml`` and its config groups (read, not composed: fast)."""
    from omegaconf import OmegaConf
    node = OmegaConf.load(os.path.join(REPO, "configs", f"{config}.yaml"))
    groups = {k for entry in node.get("defaults", []) if not isinstance(entry, str) for k in entry}
    return {str(k) for k in node if k != "defaults"} | groups


def doc_overrides() -> list:
    """pytest params (config, overrides) of the inline code spans that are Hydra overrides (every token
    ``key=value`` / ``~key`` with a top-level key of train.yaml or sample.yaml), e.g.
    ``model.compile_mode=reduce-overhead``; ``a|b|c`` values give one case per alternative."""
    keys = {"train": _top_keys("train"), "sample": _top_keys("sample")}
    params = []
    for name in DOCS:
        with open(os.path.join(REPO, name)) as f:
            prose = _FENCE.sub("", f.read())
        for span in _SPAN.findall(prose):
            if "\n\n" in span or _COMMAND.search(span) or "=" not in span.replace("==", ""):
                continue
            try:
                tokens = [re.sub(r"=<[^<>]*>$", "=X", t) for t in shlex.split(span)  # ckpt_path=<file>
                      if not t.endswith("=...")]  # `metrics=...`: a placeholder
            except ValueError:
                continue
            matches = [_TOKEN.match(t) for t in tokens]
            if not tokens or not all(matches):
                continue
            tops = {m.group(1) for m in matches}
            config = next((c for c in ("train", "sample") if tops <= keys[c]), None)
            if config is None:
                continue
            alternatives = [[]]
            for t, m in zip(tokens, matches):
                values = (m.group(2) or "").split("|") if "|" in (m.group(2) or "") and "{" not in t else [None]
                alternatives = [[*a, t if v is None else f"{t.split('=')[0]}={v}"] for a in alternatives for v in values]
            for alt in alternatives:
                params.append(pytest.param(config, alt, id=f"{name}:{' '.join(alt)}"))
    return _unique(params)


OVERRIDES = doc_overrides()


def test_the_docs_have_commands():
    """The parser finds the commands (a change of format must not silently empty the tests below)."""
    scripts = {(p.values[0], os.path.basename(p.id.split(":")[0])) for p in COMMANDS}
    for name in ("README.md", "evaluation.md", "inverse.md", "sr3.md"):
        assert ("sample", name) in scripts or ("train", name) in scripts, name
    assert sum(p.values[0] == "sample" for p in COMMANDS) >= 20
    assert sum(p.values[0] == "train" for p in COMMANDS) >= 15


def test_the_docs_have_inline_overrides():
    ids = {p.id.split(":", 1)[1] for p in OVERRIDES}
    assert "model.compile_mode=reduce-overhead" in ids and "loss=fdsm" in ids
    assert any(p.values[0] == "sample" for p in OVERRIDES)


# ----------------------------------------------------------------------------- train.py
@functools.lru_cache(maxsize=None)
def _train_script():
    return load_script("train")


@functools.lru_cache(maxsize=None)
def _sample_defaults() -> dict:
    from sgm_lightning.cli import config_defaults
    return config_defaults(os.path.join(REPO, "configs"), "sample")


def _build_train_parts(cfg) -> None:
    """What train.py builds before fitting, with the network on the meta device (no memory, no time) and
    without a dataset download; the trainer only when this machine has its accelerator."""
    import lightning as L
    from sgm_lightning.cli import build, net_config, plain, validate_train_config
    from sgm_lightning.evaluation.features import InceptionWeightsNotFoundError
    from sgm_lightning.training.lit_module import ScoreLitModule

    _train_script().check_settings(cfg)
    datamodule = build(cfg.data)  # constructors read no data
    shape = tuple(datamodule.data_shape)
    net_cfg = net_config(cfg, shape, getattr(datamodule, "num_classes", None), getattr(datamodule, "cond_shape", None))
    validate_train_config({**plain(cfg), "net": net_cfg}, data_shape=shape)
    _train_script()._check_net_takes_classes(net_cfg)
    with torch.device("meta"):
        net = build(net_cfg)
    sde = build(cfg.sde)
    loss = build(cfg.loss, sde=sde)
    optimizer = build(cfg.optim, _convert_="all")
    lr_scheduler = build(cfg.lr_schedule) if cfg.get("lr_schedule") else None
    model_kwargs = plain(cfg.model)
    model_kwargs.pop("class_conditional", None)  # the module checks compile / EMA / optimizer settings
    ScoreLitModule(net=net, sde=sde, loss=loss, **model_kwargs, optimizer=optimizer, lr_scheduler=lr_scheduler,
                   data_shape=shape, seed=int(cfg.seed))
    if cfg.get("logger") and "_target_" in cfg.logger:
        build(cfg.logger, _partial_=True)
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None or "_target_" not in node:
            continue
        try:
            build(node)
        except InceptionWeightsNotFoundError:  # a download (pip install sgm_lightning[fid]); composed above
            assert cfg.metrics.extractor._target_.endswith("InceptionV3Features"), name
    trainer_args = set(inspect.signature(L.Trainer).parameters)
    unknown = {k for k in cfg.trainer if not str(k).startswith("_")} - trainer_args
    assert not unknown, f"trainer keys that are no Trainer argument: {unknown}"
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    multi = (cfg.trainer.get("num_nodes") or 1) > 1 or str(cfg.trainer.get("strategy", "auto")).startswith("ddp")
    if accelerator in ("cpu", "auto") and not multi:
        build(cfg.trainer, logger=False, callbacks=[], enable_progress_bar=False)


def compose_train(overrides):
    """train.yaml with ``overrides`` as ``python train.py`` reads them (``group=null`` -> ``~group``)."""
    return compose_config("train", load_script("train").null_groups_dropped(list(overrides)))


@pytest.mark.parametrize("script,overrides", [p for p in COMMANDS if p.values[0] == "train"])
def test_documented_train_command_composes_and_builds(script, overrides, tmp_path):
    cfg = compose_train([*overrides, f"run_dir={tmp_path}"])
    _build_train_parts(cfg)


# ----------------------------------------------------------------------------- sample.py
def _check_sampler_options(method: str, steps, options: dict) -> None:
    """The method takes ``options`` (a 2-D Gaussian mixture's exact score, two steps)."""
    from sgm_lightning.analytic import GaussianMixture
    from sgm_lightning.sampling import sample
    from sgm_lightning.sde import VPSDE
    sde = VPSDE()
    mix = GaussianMixture(weights=[0.5, 0.5], means=[[-1.0, 0.0], [1.0, 0.0]], covs=[0.1, 0.1])
    res = sample(mix.score_fn(sde), sde, (2, 2), method, steps=None if steps is None else 2, **options)
    assert torch.isfinite(res.samples).all()


@pytest.mark.parametrize("script,overrides", [p for p in COMMANDS if p.values[0] == "sample"])
def test_documented_sample_command_composes_and_validates(script, overrides):
    from sgm_lightning.cli import build, plain, validate_sample_config
    from sgm_lightning.evaluation.features import InceptionWeightsNotFoundError
    from sgm_lightning.evaluation.inverse_tasks import METHODS as TASK_METHODS, TASKS
    cfg = compose_config("sample", overrides)
    mode = validate_sample_config(cfg, _sample_defaults())
    if mode != "task" and mode != "interpolate":
        _check_sampler_options(str(cfg.method), cfg.steps, plain(cfg.options))
    if mode == "task":
        assert cfg.task in TASKS and cfg.task_method in TASK_METHODS
    if mode == "eval":
        try:
            build(cfg.metrics.extractor)
        except InceptionWeightsNotFoundError:
            assert cfg.metrics.extractor._target_.endswith("InceptionV3Features")


# ----------------------------------------------------------------------------- inline overrides
@functools.lru_cache(maxsize=None)
def _base(config: str):
    return compose_config(config, ["run_dir=/tmp"] if config == "train" else [])


def _expand_placeholders(config: str, override: str) -> list[str]:
    """``callbacks.samples.samplers.<name>=null``: the override for every key of the parent node."""
    key, sep, value = override.partition("=")
    if "<" not in key:
        return [override]
    parent, _, rest = key.partition(".<")
    rest = rest.partition(">")[2]
    from omegaconf import OmegaConf
    children = list(OmegaConf.select(_base(config), parent.lstrip("+~")) or {})
    assert children, override
    return [f"{parent}.{c}{rest}{sep}{value}" for c in children]


def _kind(override: str) -> str:
    """What an override sets: its key (``loss``, ``model.prediction``, ``trainer``); the loss and the compile
    settings count as one (``model.compile=true`` refuses ``loss=ssm``, a mode refuses options)."""
    key = override.lstrip("+~").split("=")[0]
    if key == "loss" or key.startswith("model.compile"):
        return "loss/compile"
    return key.split(".")[0] if key.split(".")[0] in ("trainer", "experiment") else key


def _train_bins(params: list) -> list:
    """The train.py inline overrides, packed into few configs (composing is slow): at most one override of
    each kind (``_kind``) per config. A group choice of ``experiment`` is composed and built on its own, one
    of ``net`` or ``data`` (``net=noise_free_mlp`` needs 1-D data) or a ``group=null`` composed on its own and
    not built."""
    bins, alone = [], []
    commands = {tuple(o for o in c.values[1] if not o.startswith("hydra.")) for c in COMMANDS if c.values[0] == "train"}
    for p in params:
        overrides = [x for o in p.values[1] for x in _expand_placeholders("train", o)]
        if tuple(overrides) in commands:  # `experiment=sr3_digits`: a documented command, built above
            continue
        if any(re.match(r"(net|data|experiment)=", o) or o.endswith("=null") and "." not in o.split("=")[0]
               for o in overrides):  # a switched-off group (callbacks=null) would clash with its keys' overrides
            alone.append(pytest.param(overrides, overrides[0].startswith("experiment="), id=p.id))
            continue
        kinds = {_kind(o) for o in overrides}
        target = next((b for b in bins if not b[0] & kinds), None)
        if target is None:
            target = (set(), [], [])
            bins.append(target)
        target[0].update(kinds)
        target[1].extend(overrides)
        target[2].append(p.id)
    return [pytest.param(o, True, id=" + ".join(ids)) for _, o, ids in bins] + alone


TRAIN_OVERRIDES = _train_bins([p for p in OVERRIDES if p.values[0] == "train"])


@pytest.mark.parametrize("overrides,build", TRAIN_OVERRIDES)
def test_documented_train_overrides_compose_and_build(overrides, build, tmp_path):
    cfg = compose_train([*overrides, f"run_dir={tmp_path}"])
    if build:
        _build_train_parts(cfg)


@pytest.mark.parametrize("config,overrides", [p for p in OVERRIDES if p.values[0] == "sample"])
def test_documented_sample_overrides_compose_and_validate(config, overrides):
    """With ``ckpt_path`` and the mode the options belong to (``task_options=...`` -> ``mode=task``)."""
    from sgm_lightning.cli import SAMPLE_MODES, plain, validate_sample_config
    tops = {o.lstrip("+~").split("=")[0].split(".")[0] for o in overrides}
    mode = next((m for m, keys in SAMPLE_MODES.items() if tops & set(keys) and m != "grid"), None)
    extra = ["ckpt_path=X"] + ([f"mode={mode}"] if mode and "mode" not in tops else [])
    if (mode == "task" or "mode=task" in overrides) and "task" not in tops:
        extra.append("task=inpaint")
    cfg = compose_config("sample", [*overrides, *extra])
    if validate_sample_config(cfg, _sample_defaults()) in ("grid", "eval") and tops & {"method", "options"}:
        _check_sampler_options(str(cfg.method), cfg.steps, plain(cfg.options))


_CONFIG_KEY = re.compile(r"(?<![\w./<])((?:model|trainer|callbacks|data|loss|net|sde|optim|lr_schedule|logger|metrics"
                         r"|eval|interpolate)(?:\.\w+)+)(?![\w(])")


def doc_config_keys() -> list:
    """Dotted config keys named in inline code spans (``callbacks.nan_guard.check_every_n_steps``,
    ``lr_schedule.warmup_steps``, ...): a reader sets them with ``key=value``."""
    found = set()
    for name in DOCS:
        with open(os.path.join(REPO, name)) as f:
            prose = _FENCE.sub("", f.read())
        for span in _SPAN.findall(prose):
            if "\n\n" in span or "(" in span.split("=")[0] or span.lstrip().startswith("+"):
                continue  # calls (trainer.fit(...)), new keys (+callbacks.inject_nan...)
            for key in _CONFIG_KEY.findall(span):
                if not key.startswith(("trainer.fit", "trainer.save_checkpoint", "trainer.received_sigterm",
                                       "trainer.callback_metrics", "model.score", "model.eps", "model.outputs",
                                       "model.denoise", "model.target", "metrics.csv", "sde.t_from_noise_to_signal",
                                       "sde.py")):
                    found.add((name, key))
    return [pytest.param(key, id=f"{name}:{key}") for name, key in sorted(found)]


def test_documented_config_keys_exist():
    """Each dotted key the docs name exists in train.yaml (with callbacks=fid) or sample.yaml (either metrics), so that
    ``key=value`` overrides it (a missing key needs ``+key=`` and fails with 'Could not override')."""
    from omegaconf import OmegaConf
    configs = [compose_config("train", ["run_dir=/tmp", "callbacks=fid"]), compose_config("sample", ["metrics=randproj"]),
               compose_config("sample", []), compose_config("classifier", ["run_dir=/tmp"])]
    keys = doc_config_keys()
    assert len(keys) >= 20
    missing = [p.id for p in keys
               if all(OmegaConf.select(c, p.values[0], default="<missing>", throw_on_resolution_failure=False)
                      == "<missing>" for c in configs)]
    assert not missing, f"documented keys that no config has: {missing}"


def test_documented_clip_and_nan_guard_settings_reach_their_objects(tmp_path):
    """docs/training.md: ``trainer.gradient_clip_algorithm=value``; docs/training.md / robustness.md:
    ``callbacks.nan_guard.check_every_n_steps`` (1: before every optimizer step), ``on_nan=skip``, ``max_skips``."""
    from sgm_lightning.cli import build
    cfg = compose_config("train", ["trainer.gradient_clip_algorithm=value", "callbacks.nan_guard.check_every_n_steps=1",
                                   "callbacks.nan_guard.on_nan=skip", "callbacks.nan_guard.max_skips=3",
                                   f"run_dir={tmp_path}"])
    trainer = build(cfg.trainer, logger=False, callbacks=[], enable_progress_bar=False)
    assert trainer.gradient_clip_algorithm == "value" and trainer.gradient_clip_val == 1.0
    guard = build(cfg.callbacks.nan_guard)
    assert (guard.check_every_n_steps, guard.on_nan, guard.max_skips) == (1, "skip", 3)
    default = build(compose_config("train", [f"run_dir={tmp_path}"]).trainer, logger=False, callbacks=[],
                    enable_progress_bar=False)
    assert default.gradient_clip_algorithm == "norm"


def test_readme_config_table_lists_every_option_and_the_defaults():
    """README's table of config groups: every file of configs/<group>/ is listed, every listed name is a
    file, and the option marked "(default" is train.yaml's choice."""
    from omegaconf import OmegaConf
    with open(os.path.join(REPO, "README.md")) as f:
        rows = re.findall(r"^\| `(\w+)` \| (.*) \|$", f.read(), re.M)
    defaults = {k: v for entry in OmegaConf.load(os.path.join(REPO, "configs", "train.yaml")).defaults
                if not isinstance(entry, str) for k, v in entry.items()}
    groups = sorted(d for d in os.listdir(os.path.join(REPO, "configs"))
                    if os.path.isdir(os.path.join(REPO, "configs", d)))
    assert sorted(g for g, _ in rows) == groups
    for group, cell in rows:
        files = {n[:-5] for n in os.listdir(os.path.join(REPO, "configs", group)) if n.endswith(".yaml")}
        names = re.findall(r"`(\w+)`", cell.split(" (keys:")[0])
        assert files <= set(names), f"{group}: {sorted(files - set(names))} not in README's table"
        listed = [n for n in names if n in files]
        assert len(listed) == len(files), f"{group}: {names}"
        marked = re.findall(r"`(\w+)` \(default(?:\)|;| run)", cell)  # not "(default + FID ...)"
        if marked:
            assert marked == [defaults[group]], f"{group}: README says {marked}, train.yaml {defaults[group]}"


def test_documented_sampler_lists_and_defaults_match_the_code():
    """README's sampler paragraph and configs/sample.yaml's comment name every method of METHODS and every
    predictor / corrector / SDE solver / grid they list exists; the stated defaults are the code's."""
    from sgm_lightning.sampling import default_steps
    from sgm_lightning.samplers import CORRECTORS, GRIDS, METHODS, SDE_SOLVERS
    from sgm_lightning.sde import VPSDE
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    para = readme[readme.index("Samplers: `pc`"):readme.index("For few steps use")]
    named = set(re.findall(r"`(\w+)`", para))
    assert set(METHODS) <= named, sorted(set(METHODS) - named)
    assert set(re.findall(r"`corrector` = (`\w+`(?: \| `\w+`)*)", para)[0].replace("`", "").split(" | ")) == set(CORRECTORS)
    assert set(re.findall(r"`solver` =\s+(`\w+`(?: \|\s+`\w+`)*)", para)[-1].replace("`", "").split()) - {"|"} \
        == set(SDE_SOLVERS)
    assert set(re.findall(r"`grid` =\s+(`\w+`(?: \|\s+`\w+`)*)", para)[0].replace("`", "").split()) - {"|"} == set(GRIDS)
    with open(os.path.join(REPO, "configs", "sample.yaml")) as f:
        comment = re.search(r"^method: (\w+) +# (.*)$", f.read(), re.M)
    assert set(re.findall(r"\w+", comment.group(2))) == set(METHODS)
    # "default `unipc` with 10 steps" (README), "unipc: 10 NFE" (sample.yaml)
    assert comment.group(1) == "unipc" and "default `unipc` with 10 steps" in readme
    assert default_steps("unipc", VPSDE()) == 10


def test_readme_python_snippet_runs():
    """README's math-layer snippet runs as printed (heun with 18 levels: 35 NFE; finite NLLs)."""
    with open(os.path.join(REPO, "README.md")) as f:
        blocks = [body for lang, body in _FENCE.findall(f.read()) if lang == "python"]
    assert len(blocks) == 1 and "log_likelihood" in blocks[0]
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert scope["out"].samples.shape == (1000, 2) and scope["out"].nfe == 35
    assert scope["nll"].shape == (8,) and torch.isfinite(scope["nll"]).all()
