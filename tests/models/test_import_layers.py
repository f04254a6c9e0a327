"""Layering: lower layers never import higher ones (ops < models < training), old import paths of
the trainers still work, and the CLI's model registry names every model itself.

The import checks run in a fresh interpreter (``sys.executable -c``) so that what this test
process already imported does not hide an import.
"""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import resnet_bk

# The `--model` names of `python -m resnet_bk.training.train` before the registry moved to training/.
CLI_MODELS = ["act", "early_exit", "hierarchical", "learned_length", "multiscale", "plain", "sparse"]

# (old import path, name, new home): the trainers live in resnet_bk.training; their prototype names
# under resnet_bk.models must still give the same class object.
TRAINERS = [
    ("resnet_bk.models", "ACTTrainer", "resnet_bk.training.act"),
    ("resnet_bk.models.act", "ACTTrainer", "resnet_bk.training.act"),
    ("resnet_bk.models", "LearnedSequenceLengthTrainer", "resnet_bk.training.learned_length"),
    ("resnet_bk.models.learned_length", "LearnedSequenceLengthTrainer", "resnet_bk.training.learned_length"),
    ("resnet_bk.models", "AdaptiveSparsityScheduler", "resnet_bk.training.sparsity"),
    ("resnet_bk.models.sparse", "AdaptiveSparsityScheduler", "resnet_bk.training.sparsity"),
    ("resnet_bk.training", "GradientCachingTrainer", "resnet_bk.training.data_efficiency"),
]


def _run(code: str) -> str:
    """stdout of ``code`` run in a fresh interpreter that imports this checkout's resnet_bk."""
    root = str(Path(resnet_bk.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout


def _modules_after(stmt: str) -> list:
    out = _run(f"import json, sys\n{stmt}\n"
               "print(json.dumps(sorted(m for m in sys.modules if m.startswith('resnet_bk'))))")
    return json.loads(out.strip().splitlines()[-1])


def test_models_never_import_training():
    loaded = _modules_after("import resnet_bk.models")
    assert "resnet_bk.models.sparse" in loaded and "resnet_bk.models.learned_length" in loaded
    assert "resnet_bk.training.train" not in loaded
    assert [m for m in loaded if m == "resnet_bk.training" or m.startswith("resnet_bk.training.")] == []


@pytest.mark.parametrize("stmt", ["import resnet_bk", "import resnet_bk.ops"])
def test_ops_never_import_models_or_training(stmt):
    loaded = _modules_after(stmt)
    assert "resnet_bk.ops" in loaded
    higher = [m for m in loaded if m.split(".")[:2] in (["resnet_bk", "models"], ["resnet_bk", "training"])]
    assert higher == []


@pytest.mark.parametrize("old, name, new", TRAINERS)
def test_trainer_old_import_paths_give_the_same_class(old, name, new):
    cls = getattr(importlib.import_module(new), name)
    assert cls.__module__ == new
    assert getattr(importlib.import_module(old), name) is cls
    ns = {}
    exec(f"from {old} import {name}", ns)
    assert ns[name] is cls
    assert getattr(importlib.import_module("resnet_bk.training"), name) is cls


def test_lazy_reexport_rejects_unknown_names():
    import resnet_bk.models as models
    with pytest.raises(AttributeError, match="no_such_name"):
        models.no_such_name
    assert {"ACTTrainer", "LearnedSequenceLengthTrainer", "AdaptiveSparsityScheduler"} <= set(dir(models))


def test_registry_names_every_cli_model():
    from resnet_bk.training import registry, train
    assert train.MODELS is registry.MODELS and train.register_model is registry.register_model
    assert set(CLI_MODELS) <= set(registry.MODELS)
    # In a fresh interpreter: the registry alone names them all (nothing registers itself on import),
    # and `python -m resnet_bk.training.train` (this file as __main__) offers exactly those.
    assert json.loads(_run("import json\nfrom resnet_bk.training.registry import MODELS\n"
                           "print(json.dumps(sorted(MODELS)))").strip()) == CLI_MODELS
    out = _run("import runpy, sys\nsys.argv = ['train', '--help']\n"
               "try:\n    runpy.run_module('resnet_bk.training.train', run_name='__main__')\n"
               "except SystemExit:\n    pass\n")
    assert "{" + ",".join(CLI_MODELS) + "}" in out.replace("\n", "").replace(" ", "")
