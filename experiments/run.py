#!/usr/bin/env python
"""QRPO, DPO, SimPO and REBEL on one real task, on a CPU: "answer these prompts more positively".

    python experiments/run.py --config experiments/config.yaml                 # everything (~60 min on 2 idle cores)
    python experiments/run.py --config experiments/config.yaml --quick         # the same pipeline, small (~9 min)
    python experiments/run.py --config experiments/config.yaml --comparison    # the 4 methods x 3 seeds (~27 min)
    python experiments/run.py --config experiments/config.yaml --frontier      # reward-KL frontiers (~2 h 20 min)
    python experiments/run.py --quick --train_epochs 2 --groups main           # flags override the file

Options: experiments/config.py (`--help` lists them). Stages, each resuming from `work_dir` (finished work is skipped,
so a killed run continues when started again): split, references, score, pairs, pointwise (experiments/stages.py);
pi_ref's evaluation, then one training and evaluation per planned run (experiments/runs.py, experiments/plan.py);
tables and plots in `results_dir` (experiments/report.py).
"""

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "benchmarks")]  # this folder's modules, then benchmarks/common.py

# Before transformers is imported: offline, quiet (benchmarks/common.py also puts the repository root on sys.path).
from common import use_offline_defaults

use_offline_defaults()

from config import parse_args
from plan import POWERED_ARMS, run_specs, train_steps
from report import build_report, restore_work_dir
from stages import (
    stage_all_pairs,
    stage_pairs,
    stage_pointwise,
    stage_references,
    stage_score,
    stage_split,
)

from runs import log, set_threads, stage_reference_eval, stage_runs
from trl_qrpo.precompute.io import write_json


def resolve_model(name: str) -> str:
    if name == "smollm2":
        from trl_qrpo.scripts.prepare_smollm2 import prepare_smollm2

        return str(prepare_smollm2())
    return str(Path(name).expanduser().resolve())


def main(argv=None) -> int:
    cfg, options = parse_args(argv)
    profile = options.profile
    work, results = Path(cfg.work_dir), Path(cfg.results_dir)
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / "config.json", vars(cfg))
    if options.report_only:
        build_report(cfg, work, results)
        return 0
    if options.report_from:
        import tempfile

        with tempfile.TemporaryDirectory() as restored:
            restore_work_dir(Path(options.report_from), Path(restored))
            build_report(cfg, Path(restored), results)
        return 0

    import torch

    timing_path = work / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}

    def timed(name, fn, *a):
        if name in ("references", "reference_eval"):
            set_threads(cfg.threads)
        start, cpu_start = time.time(), time.process_time()
        result = fn(*a)
        timing[name] = timing.get(name, 0.0) + time.time() - start
        timing[f"{name}_cpu"] = timing.get(f"{name}_cpu", 0.0) + time.process_time() - cpu_start
        write_json(timing_path, timing)
        return result

    wall = time.time()
    log(f"config {options.config}{f' (--{profile})' if profile else ''}; work_dir {work}")
    model_path = timed("model", resolve_model, cfg.model)
    train, eval_ds, validation = timed("split", stage_split, cfg, work)
    log(
        f"{len(train)} train prompts, {len(eval_ds)} eval prompts"
        f"{f', {len(validation)} validation prompts' if validation else ''}; model {model_path}"
    )
    refs = timed("references", stage_references, cfg, work, train, model_path)
    scored = timed("score", stage_score, cfg, work, refs)
    pairs = timed("pairs", stage_pairs, cfg, work, scored)
    log(f"{len(pairs)} training pairs; data statistics in {work / 'data_stats.json'}")
    pointwise = all_pairs = None
    planned = run_specs(cfg, {arm: 0.0 for arm in POWERED_ARMS})  # every data a run may need
    if any(s.get("data") == "pointwise" for s in planned):
        pointwise = timed("pointwise", stage_pointwise, cfg, work, scored, pairs)
        log(f"{len(pointwise)} pointwise rows ({cfg.references_num_candidates} per prompt)")
    if any(s.get("data") == "all_pairs" for s in planned):
        # as many pairs as the fixed steps take: the other arms' sequences per run
        count = train_steps(cfg, len(pairs)) * cfg.train_batch_size
        all_pairs = timed("all_pairs", stage_all_pairs, cfg, work, scored, pairs, count)
        log(f"{len(all_pairs)} pairs drawn from all pairs of the candidates")
    if options.until == "pairs":
        return 0

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ref_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, cfg.dtype)).eval()
    timed("reference_eval", stage_reference_eval, cfg, work, eval_ds, ref_model, tokenizer)
    if options.until == "reference":
        return 0
    only = set(options.only) if options.only else None
    timed(
        "runs",
        stage_runs,
        cfg,
        work,
        pairs,
        eval_ds,
        model_path,
        ref_model,
        tokenizer,
        only,
        pointwise,
        all_pairs,
        validation,
    )
    timed("report", build_report, cfg, work, results)
    timing["last_invocation_wall_seconds"] = time.time() - wall
    timing["last_invocation_cpu_seconds"] = time.process_time()
    write_json(timing_path, timing)
    log(f"done in {time.time() - wall:.0f} s; results in {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
