"""The shape of the public API: options travel as config dataclasses, columns come from one module.

- No public function or method of trl_qrpo takes more than 10 parameters (options are grouped into documented
  dataclasses, as TRL's trainers take a config). A method that keeps the signature of the TRL / transformers method
  it overrides (QRPOTrainer.__init__ mirrors DPOTrainer.__init__, so a DPO script ports unchanged) is exempt.
- Every field of every pre-computation config has help text and a default.
- The stages spell no column name of their own: they import them from trl_qrpo.columns.
"""

import ast
import dataclasses
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import trl_qrpo

MAX_PARAMETERS = 10
PACKAGE_DIR = Path(trl_qrpo.__file__).parent


def _modules():
    for info in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="trl_qrpo."):
        if info.name.endswith(("__main__", "_build")) or ".vllm_engine" in info.name:
            continue
        yield importlib.import_module(info.name)


def _parameters(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p not in ("self", "cls")]


def _inherited_signature(cls, name: str, params: list[str]) -> bool:
    for base in cls.__mro__[1:]:
        if base.__module__.startswith("trl_qrpo") or not hasattr(base, name):
            continue
        try:
            return _parameters(getattr(base, name)) == params
        except (TypeError, ValueError):
            return False
    return False


def test_no_public_function_takes_more_than_ten_parameters():
    too_long = {}
    for module in _modules():
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj):
                params = _parameters(obj)
                if len(params) > MAX_PARAMETERS:
                    too_long[f"{module.__name__}.{name}"] = len(params)
            elif inspect.isclass(obj) and not dataclasses.is_dataclass(obj):
                for method_name, method in vars(obj).items():
                    if not inspect.isfunction(method) or (method_name.startswith("_") and method_name != "__init__"):
                        continue
                    params = _parameters(method)
                    if len(params) > MAX_PARAMETERS and not _inherited_signature(obj, method_name, params):
                        too_long[f"{module.__name__}.{name}.{method_name}"] = len(params)
    assert not too_long, f"public callables with more than {MAX_PARAMETERS} parameters: {too_long}"


def test_the_trainer_keeps_dpo_signature():
    from trl import DPOTrainer

    from trl_qrpo import QRPOTrainer

    assert _parameters(QRPOTrainer.__init__) == _parameters(DPOTrainer.__init__)


@pytest.mark.parametrize(
    "name", ["GenerateConfig", "ScoreConfig", "BuildOffPolicyConfig", "MergeConfig", "EvaluateConfig"]
)
def test_every_config_field_has_help_and_a_default(name):
    from trl_qrpo.precompute import config

    cls = getattr(config, name)
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{name}.{f.name} has no help text"
        assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name


def test_model_fields_reuse_trl_model_config():
    from trl import ModelConfig

    from trl_qrpo.precompute import GenerateConfig

    ours = {f.name: f for f in dataclasses.fields(GenerateConfig)}
    theirs = {f.name: f for f in dataclasses.fields(ModelConfig)}
    for name in ("model_name_or_path", "model_revision", "dtype", "attn_implementation"):
        assert name in ours and name in theirs
    assert ours["attn_implementation"].metadata["help"] == theirs["attn_implementation"].metadata["help"]


COLUMN_STRINGS = {
    "ref_completions",
    "ref_rewards",
    "ref_truncated",
    "ref_num_tokens",
    "chosen_reward",
    "rejected_reward",
    "in_ref_rewards",
    "chosen_in_ref_rewards",
    "rejected_in_ref_rewards",
    "prompt_ids",
    "completion_ids",
    "logratio",
}


@pytest.mark.parametrize(
    "path",
    [
        "precompute/io.py",
        "precompute/generate.py",
        "precompute/scoring.py",
        "precompute/offpolicy.py",
        "precompute/evaluate.py",
        "data.py",
        "trainer.py",
    ],
)
def test_stages_take_column_names_from_the_column_module(path):
    """String constants naming a column appear only in trl_qrpo/columns.py (docstrings and messages aside)."""
    tree = ast.parse((PACKAGE_DIR / path).read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    in_fstrings = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values}
    spelled = sorted(
        {
            node.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value in COLUMN_STRINGS
            and id(node) not in docstrings
            and id(node) not in in_fstrings
        }
    )
    assert not spelled, f"{path} spells column names {spelled}: import them from trl_qrpo.columns"
