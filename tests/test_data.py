"""trl_qrpo.data on its own (no model, no tokenizer): the options objects of the two steps, and the quantile and
target steps on Arrow tables against counts and closed forms done here."""

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch
from datasets import Dataset

from trl_qrpo.data import (
    QuantileOptions,
    TargetOptions,
    detect_layout,
    map_quantiles,
    map_targets,
    quantile_batch,
    target_batch,
)
from trl_qrpo.transforms import get_transform

ARGS = SimpleNamespace(
    num_ref_rewards=None,
    ties="le",
    sample_selector="both",
    self_inclusion="leave_one_out",
    seed=7,
    transform="identity",
    transform_kwargs=None,
    beta=0.1,
    partition_mode="continuous",
    normalize_beta_by_length=False,
    max_length=None,
    truncation_mode="keep_start",
)


def rows(n=6, refs=5, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "prompt": f"p{i}",
            "completion": f" c{i}",
            "reward": float(rng.normal()),
            "ref_rewards": rng.normal(size=refs),
        }
        for i in range(n)
    ]


def test_options_are_frozen_and_built_from_a_config():
    quantile = QuantileOptions.from_args(ARGS)
    assert quantile == QuantileOptions(None, "le", "both", "leave_one_out", 7)
    targets = TargetOptions.from_args(ARGS)
    assert targets.transform.name == "identity" and targets.beta == 0.1 and targets.in_quantile_pass
    with pytest.raises(dataclasses.FrozenInstanceError):
        targets.beta = 1.0
    # A resolved (e.g. fitted) transform is passed as is.
    log = get_transform("log")
    assert TargetOptions.from_args(ARGS, log).transform is log
    # Targets that need token counts or the data set's statistics cannot come with the quantiles.
    assert not TargetOptions.from_args(
        SimpleNamespace(**{**vars(ARGS), "normalize_beta_by_length": True})
    ).in_quantile_pass
    scaled = TargetOptions.from_args(ARGS, get_transform("scaled-normal-icdf"))
    assert not scaled.in_quantile_pass


def test_targets_in_the_quantile_pass_equal_the_separate_pass():
    data = rows()
    table = pa.Table.from_pylist(data)
    layout = detect_layout(table.column_names)
    options, targets = QuantileOptions.from_args(ARGS), TargetOptions.from_args(ARGS)
    together = quantile_batch(table, list(range(len(data))), layout, options, targets=targets)
    separate = target_batch(quantile_batch(table, list(range(len(data))), layout, options), targets)
    for column in ("target", "beta", "beta_log_z", "quantile"):
        assert together.column(column).to_pylist() == separate.column(column).to_pylist()
    # The values, counted and derived here: q = #{S <= r} / n, target = q - beta log(beta (e^(1/beta) - 1)).
    for row, target in zip(data, together.column("target").to_pylist(), strict=True):
        q = float(np.mean(row["ref_rewards"] <= row["reward"]))
        assert target == [pytest.approx(q - 0.1 * math.log(0.1 * math.expm1(10)), abs=1e-12)]
    late = TargetOptions.from_args(SimpleNamespace(**{**vars(ARGS), "normalize_beta_by_length": True}))
    with pytest.raises(ValueError, match="after tokenization"):
        quantile_batch(table, list(range(len(data))), layout, options, targets=late)


def test_map_steps_take_one_options_object_each():
    dataset = Dataset.from_list(rows(12, seed=1))
    layout = detect_layout(dataset.column_names)
    options, targets = QuantileOptions.from_args(ARGS), TargetOptions.from_args(ARGS, get_transform("sqrt"))
    one_pass = map_quantiles(dataset, layout, options, targets=targets)
    two_passes = map_targets(map_quantiles(dataset, layout, options), targets)
    assert one_pass["target"] == two_passes["target"]
    beta = 0.1  # sqrt: log Z = log(2 beta) + 1/beta + log1p(beta expm1(-1/beta)); checked naively here
    log_z = math.log(2 * beta * (math.exp(1 / beta) * (1 - beta) + beta))
    q = torch.tensor(one_pass["quantile"], dtype=torch.float64)
    assert torch.allclose(torch.tensor(one_pass["target"], dtype=torch.float64), q.sqrt() - beta * log_z)
