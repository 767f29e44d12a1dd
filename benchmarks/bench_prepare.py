"""Dataset preparation: QRPOTrainer against DPOTrainer on the same paired rows (issue 15, item 1).

    python benchmarks/bench_prepare.py                         # 20,000 pairs x 16 reference rewards, 5 rounds
    python benchmarks/bench_prepare.py --rows 20000 --refs 16 --rounds 5 --formats plain,conversational

Both trainers are constructed on the same tiny model folder, tokenizer and `datasets.Dataset` of paired rows (prompt,
chosen, rejected, a reward for each and --refs reference rewards; DPO ignores the reward columns), with the same
config otherwise (TRL's defaults: max_length 1024, keep_start, one process). Each round builds DPOTrainer and
QRPOTrainer in turn (who goes first alternates) in this one process; a round times
- *prepare s*: the trainer's own `_prepare_dataset` on the training set (wrapped with a timer: DPO's prompt/EOS/
  tokenize/filter maps, QRPO's validation, quantiles, tokenization, filter and targets),
- *init s*: the whole constructor (model and reference model loading included, the same for both).
*QRPO / DPO* is the median over rounds of the per-round ratio of prepare times (both measured within seconds of each
other, which cancels slow drifts of the machine's load). Target: at most 1.1. Writes results/prepare.json and .png.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time

import common

PREPARE_S: dict[str, float] = {}


def _time_prepare():
    """Wrap both trainers' _prepare_dataset to record the training set's preparation time (instrumentation only)."""
    from trl import DPOTrainer

    from trl_qrpo import QRPOTrainer

    for cls, name in ((QRPOTrainer, "qrpo"), (DPOTrainer, "dpo")):
        original = cls.__dict__["_prepare_dataset"]

        @functools.wraps(original)
        def timed(self, dataset, processing_class, args, dataset_name, _original=original, _name=name):
            start = time.perf_counter()
            try:
                return _original(self, dataset, processing_class, args, dataset_name)
            finally:
                if dataset_name == "train":
                    PREPARE_S[_name] = time.perf_counter() - start

        setattr(cls, "_prepare_dataset", timed)


def make_dataset(rows: int, refs: int, conversational: bool, seed: int = 0):
    from datasets import Dataset

    pairs = common.synthetic_pairs(rows, prompt_words=16, completion_words=32, num_refs=refs, seed=seed)
    if conversational:
        for pair in pairs:
            pair["prompt"] = [{"role": "user", "content": pair["prompt"]}]
            for side in ("chosen", "rejected"):
                pair[side] = [{"role": "assistant", "content": pair[side].strip()}]
    return Dataset.from_list(pairs)


def build(name: str, path: str, tokenizer, dataset, output_dir: str):
    from trl import DPOConfig, DPOTrainer

    from trl_qrpo import QRPOConfig, QRPOTrainer

    config_cls, trainer_cls = (QRPOConfig, QRPOTrainer) if name == "qrpo" else (DPOConfig, DPOTrainer)
    args = config_cls(output_dir=output_dir, bf16=False, use_cpu=True, report_to="none", save_strategy="no")
    start = time.perf_counter()
    trainer = trainer_cls(model=path, args=args, train_dataset=dataset, processing_class=tokenizer)
    init_s = time.perf_counter() - start
    rows = len(trainer.train_dataset)
    del trainer
    return init_s, rows


def run_format(fmt: str, args, path: str) -> dict:
    import gc

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    dataset = make_dataset(args.rows, args.refs, conversational=fmt == "conversational")
    times = {"qrpo": [], "dpo": []}
    inits = {"qrpo": [], "dpo": []}
    kept = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("dpo", "qrpo"):  # warm-up: imports, first calls (not measured)
            build(name, path, tokenizer, dataset.select(range(min(200, args.rows))), tmp)
        for r in range(args.rounds):
            order = ("dpo", "qrpo") if r % 2 == 0 else ("qrpo", "dpo")
            for name in order:
                gc.collect()
                PREPARE_S.clear()
                init_s, kept[name] = build(name, path, tokenizer, dataset, tmp)
                times[name].append(PREPARE_S[name])
                inits[name].append(init_s)
                print(f"{fmt} round {r} {name}: prepare {PREPARE_S[name]:.2f} s, init {init_s:.2f} s", flush=True)
    ratios = [q / d for q, d in zip(times["qrpo"], times["dpo"], strict=True)]
    return {
        "format": fmt,
        "rows": args.rows,
        "refs": args.refs,
        "kept_rows": kept,
        "prepare_s": times,
        "init_s": inits,
        "prepare_median_s": {k: statistics.median(v) for k, v in times.items()},
        "init_median_s": {k: statistics.median(v) for k, v in inits.items()},
        "ratio_median_of_ratios": statistics.median(ratios),
        "ratios": ratios,
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--refs", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--formats", default="plain,conversational", help="comma-separated: plain, conversational")
    p.add_argument("--size", default="tiny", help="model size (see common.SIZES)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--name", default="prepare")
    args = p.parse_args(argv)
    if args.smoke:
        p.set_defaults(rows=300, rounds=1, formats="plain")
        args = p.parse_args(argv)
    return args


COLUMNS = [
    ("format", "data"),
    ("rows", "pairs"),
    ("dpo_s", "DPO prepare s"),
    ("qrpo_s", "QRPO prepare s"),
    ("ratio", "QRPO / DPO"),
    ("dpo_init", "DPO init s"),
    ("qrpo_init", "QRPO init s"),
    ("met", "<= 1.1"),
]


def main(argv=None):
    args = parse_args(argv)
    _time_prepare()
    path = str(common.model_dir(args.size))
    machine = common.machine_info()
    with common.LoadMonitor() as load:
        results = [run_format(fmt.strip(), args, path) for fmt in args.formats.split(",")]
    rows = [
        {
            "format": r["format"],
            "rows": r["rows"],
            "dpo_s": r["prepare_median_s"]["dpo"],
            "qrpo_s": r["prepare_median_s"]["qrpo"],
            "ratio": r["ratio_median_of_ratios"],
            "dpo_init": r["init_median_s"]["dpo"],
            "qrpo_init": r["init_median_s"]["qrpo"],
            "met": "yes" if r["ratio_median_of_ratios"] <= 1.1 else "NO",
        }
        for r in results
    ]
    common.print_table(
        rows, COLUMNS, title=f"Dataset preparation, {args.refs} reference rewards, median of {args.rounds} rounds"
    )

    def draw(plt):
        fig, ax = plt.subplots(figsize=(7, 3.5))
        names = [r["format"] for r in results]
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [r["prepare_median_s"]["dpo"] for r in results], 0.4, label="DPOTrainer")
        ax.bar([x + 0.2 for x in xs], [r["prepare_median_s"]["qrpo"] for r in results], 0.4, label="QRPOTrainer")
        ax.set_xticks(list(xs), names)
        ax.set_ylabel(f"_prepare_dataset s ({args.rows:,} pairs)")
        ax.legend()
        fig.suptitle("Dataset preparation: QRPO vs DPO (CPU)")

    return common.save(
        "prepare",
        args,
        machine,
        load.summary(),
        draw,
        results=results,
        table=rows,
        target_met=all(r["ratio_median_of_ratios"] <= 1.1 for r in results),
    )


if __name__ == "__main__":
    main()
