"""Several processes on this CPU machine: DDP and DeepSpeed ZeRO-3 (gloo) give the losses of one process.

Every multi-process run uses the shipped accelerate configs (recipes/accelerate_configs/) the way users do, with the
GPU-only values overridden on the command line (`--num_processes 2 --mixed_precision no`, and the script's
`--bf16 false`); the launcher (the training script, and tests/distributed_train.py the same way) sees the missing GPU
and sets gloo up before the flags become a QRPOConfig (see `apply_cpu_only_launch_defaults` in
trl_qrpo/distributed.py); QRPOConfig itself does nothing of the kind. Against one process, in-process, on the same global batch (1 x 4 rows vs 2 x 2 rows, same seed,
so the same rows in every step):

- `trl qrpo` (python -m trl_qrpo) with zero3_multinode.yaml, as 2 nodes of 1 process on localhost, started the way
  the SLURM example in the README starts them (same command, --machine_rank 0 and 1);
- tests/distributed_train.py under ddp.yaml (DDP) and zero3.yaml (ZeRO-3: the policy and the separate reference model
  sharded; precompute_ref_log_probs; LoRA with the adapters off as reference, and with a separate reference model);
- a ZeRO-3 run stopped after step 2 (its checkpoint saved), resumed by `trl qrpo --resume_from_checkpoint`, against
  the uninterrupted run.

Tolerance: losses agree to rel 1e-4 (seen: 1e-7 to 1e-6). The runs differ only in the order of fp32 sums: two
half-batch gradients all-reduced over gloo instead of one full-batch sum, and matmuls over 2 rows (padded to their
own longest sequence) instead of 4; a few ulps (1e-7 relative) per operation, carried through 4 AdamW steps. A wrong
split of the batch, a missing gradient sync or a wrong reference moves the losses of steps 2-4 by 1e-2 or more. A
resumed ZeRO-3 run replays the uninterrupted one on the same 2 ranks: rel 1e-6 (seen: identical).

Cost: about 3 minutes on 2 shared cores, 7 launches of 15-45 s each. The first DeepSpeed run on a machine
JIT-compiles DeepSpeed's CPU communication op (deepspeed_shm_comm, 30 s to 2 min, cached under
~/.cache/torch_extensions; measured 1.5 min here, 4.6 min for the whole file): the `deepspeed_cpu_op` fixture builds
it once, in one process, before the first launch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from distributed_train import parse, train, write_rows

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "accelerate_configs"
HELPER = Path(__file__).resolve().parent / "distributed_train.py"

STEPS = 4
HYPER = ["--max_steps", str(STEPS), "--logging_steps", "1", "--report_to", "none", "--beta", "0.1"]
HYPER += ["--learning_rate", "1e-3", "--bf16", "false", "--seed", "0"]
CPU_OVERRIDES = ["--num_processes", "2", "--mixed_precision", "no"]  # the shipped configs say 8 GPUs, bf16
RTOL = 1e-4
RTOL_RESUME = 1e-6

# gloo sometimes aborts a process while the process group is torn down at exit, after all work is done.
TEARDOWN_ABORT = "terminate called without an active exception"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def _finish(name: str, returncode: int, log: Path, completed: bool) -> None:
    """A run passes if it exited 0, or if it completed its work and only gloo's teardown aborted afterwards."""
    if returncode == 0:
        return
    text = log.read_text(errors="replace")
    if completed and TEARDOWN_ABORT in text:
        warnings.warn(f"{name}: a process aborted in gloo's teardown after the run completed (exit {returncode}).")
        return
    pytest.fail(f"{name} exited with {returncode}; end of {log}:\n{text[-6000:]}")


def _accelerate_launch(name, config, args, tmp, timeout=400) -> dict:
    """tests/distributed_train.py under `accelerate launch --config_file <shipped config>`, 2 processes; its result."""
    result, log = tmp / f"{name}.json", tmp / f"{name}.log"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), *CPU_OVERRIDES]
    command += ["--main_process_port", str(_free_port()), str(HELPER), "--result", str(result), *args]
    with open(log, "w") as handle:
        proc = subprocess.run(
            command, env=_env(), stdout=handle, stderr=subprocess.STDOUT, timeout=timeout, cwd=tmp, check=False
        )
    _finish(name, proc.returncode, log, result.exists())
    return json.loads(result.read_text())


def _trl_qrpo(args, log: Path) -> subprocess.Popen:
    """`python -m trl_qrpo ARGS` (= `trl qrpo ARGS`), output to `log`."""
    with open(log, "w") as handle:
        command = [sys.executable, "-m", "trl_qrpo", *args]
        return subprocess.Popen(command, env=_env(), stdout=handle, stderr=subprocess.STDOUT, cwd=log.parent)


def _wait(name, proc, log, saved_log=None, timeout=400) -> None:
    """Wait for a `trl qrpo` run; it completed if `saved_log` (default: its own log) says the model was saved."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    _finish(name, proc.returncode, log, "Model saved to" in (saved_log or log).read_text(errors="replace"))


def _logged_losses(output_dir: Path) -> dict[str, float]:
    """Losses by step from the trainer state of the last checkpoint (full precision, unlike the printed logs)."""
    last = max(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    history = json.loads((last / "trainer_state.json").read_text())["log_history"]
    return {str(h["step"]): h["loss"] for h in history if "loss" in h}


def assert_losses_close(actual: dict, expected: dict, rtol: float, steps=None):
    steps = steps or sorted(expected, key=int)
    assert [s for s in steps if s not in actual] == [], (actual, expected)
    got, want = [actual[s] for s in steps], [expected[s] for s in steps]
    assert got == pytest.approx(want, rel=rtol), f"steps {steps}: {got} vs {want}"


# ---------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def rows(work) -> Path:
    return write_rows(work / "rows.jsonl")


@pytest.fixture(scope="module")
def single(work, rows, tiny_model_dir) -> dict:
    """One process, in-process, 4 rows per step: plain, LoRA (adapters off as reference), LoRA + separate reference."""
    runs = {}
    for name, extra in {"plain": [], "lora": ["--lora"], "lora_ref": ["--lora", "--ref_model"]}.items():
        argv = ["--model", str(tiny_model_dir), "--data", str(rows), "--result", str(work / f"single_{name}.json")]
        argv += ["--output_dir", str(work / f"single_{name}"), "--per_device_train_batch_size", "4"]
        argv += ["--save_strategy", "no", *HYPER, *extra]
        runs[name] = train(*parse(argv))
    return runs


@pytest.fixture(scope="session")
def deepspeed_cpu_op():
    """DeepSpeed's CPU communication op, JIT-built once in one process (not by both ranks of the first launch)."""
    pytest.importorskip("deepspeed")
    code = (
        "from deepspeed.accelerator import get_accelerator\n"
        "builder = get_accelerator().create_op_builder('ShareMemCommBuilder')\n"
        "builder is None or builder.load()\n"
    )
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return time.monotonic() - start


def _helper_args(tiny_model_dir, rows, output_dir, *extra):
    """Trains on `rows` (a .jsonl file), or with rows=None on the same rows built in memory (`make_rows()`)."""
    args = ["--model", str(tiny_model_dir), "--output_dir", str(output_dir)] + (["--data", str(rows)] if rows else [])
    return [*args, "--per_device_train_batch_size", "2", "--save_strategy", "no", *HYPER, *extra]


def _cli_args(tiny_model_dir, rows, output_dir, *extra):
    args = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(rows), "--output_dir", str(output_dir)]
    return [*args, "--per_device_train_batch_size", "2", *HYPER, *extra]


@pytest.fixture(scope="module")
def ddp_run(work, rows, tiny_model_dir):
    args = _helper_args(tiny_model_dir, rows, work / "ddp")
    return _accelerate_launch("ddp", CONFIGS / "ddp.yaml", args, work)


@pytest.fixture(scope="module")
def multinode_run(work, rows, tiny_model_dir, deepspeed_cpu_op):
    """`trl qrpo --accelerate_config zero3_multinode.yaml`: 2 nodes x 1 process, both on localhost."""
    output_dir, port = work / "multinode", _free_port()
    launch = ["--accelerate_config", str(CONFIGS / "zero3_multinode.yaml"), "--num_machines", "2", *CPU_OVERRIDES]
    launch += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
    train_args = _cli_args(tiny_model_dir, rows, output_dir, "--save_strategy", "steps", "--save_steps", "2")
    logs = [work / f"multinode_{rank}.log" for rank in (0, 1)]
    procs = [_trl_qrpo([*launch, "--machine_rank", str(r), *train_args], logs[r]) for r in (0, 1)]
    try:
        for rank, (proc, log) in enumerate(zip(procs, logs)):
            _wait(f"multinode node {rank}", proc, log, saved_log=logs[0])  # only the main process prints "Model saved"
    finally:
        for proc in procs:  # a node left alone after the other failed would wait for it
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {"losses": _logged_losses(output_dir), "output_dir": output_dir}


@pytest.fixture(scope="module")
def stopped_run(work, rows, tiny_model_dir, deepspeed_cpu_op):
    """ZeRO-3, 2 processes, a separate reference model (the full fine-tuning default), stopped after step 2."""
    args = _helper_args(tiny_model_dir, rows, work / "stopped", "--stop_after", "2")
    args += ["--save_strategy", "steps", "--save_steps", "2"]
    return _accelerate_launch("zero3_stopped", CONFIGS / "zero3.yaml", args, work)


@pytest.fixture(scope="module")
def resumed_run(work, rows, tiny_model_dir, stopped_run):
    """`trl qrpo --accelerate_config zero3.yaml --resume_from_checkpoint .../checkpoint-2`, to step 4."""
    output_dir = work / "stopped"
    args = ["--accelerate_config", str(CONFIGS / "zero3.yaml"), *CPU_OVERRIDES]
    args += ["--main_process_port", str(_free_port())]
    args += _cli_args(tiny_model_dir, rows, output_dir, "--save_strategy", "steps", "--save_steps", "2")
    args += ["--resume_from_checkpoint", str(output_dir / "checkpoint-2")]
    log = work / "zero3_resumed.log"
    _wait("zero3 resumed", _trl_qrpo(args, log), log)
    return {"losses": _logged_losses(output_dir)}


def _zero3(name, work, rows, tiny_model_dir, *extra):
    args = _helper_args(tiny_model_dir, rows, work / name, *extra)
    return _accelerate_launch(name, CONFIGS / "zero3.yaml", args, work)


# ------------------------------------------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_one_process_reference_runs(single):
    plain, lora, lora_ref = single["plain"], single["lora"], single["lora_ref"]
    assert plain["global_step"] == STEPS and len(plain["losses"]) == STEPS
    assert plain["processes"][0]["has_ref_model"]  # full fine-tuning without precompute: a reference model is loaded
    assert not lora["processes"][0]["has_ref_model"] and lora_ref["processes"][0]["has_ref_model"]
    # LoRA's B starts at zero, so the policy starts as the reference; a separate copy of the base model as reference
    # and the policy with its adapters off are the same reference at every step.
    assert_losses_close(lora_ref["losses"], lora["losses"], RTOL_RESUME)
    assert lora["losses"]["1"] == pytest.approx(plain["losses"]["1"], rel=RTOL)
    assert lora["losses"]["2"] != pytest.approx(plain["losses"]["2"], rel=1e-2)  # LoRA trains other parameters


@pytest.mark.slow
def test_ddp_two_processes_give_the_losses_of_one(single, ddp_run):
    for process in ddp_run["processes"]:
        assert process["world_size"] == 2 and process["distributed_type"] == "DistributedType.MULTI_CPU"
        assert not process["deepspeed"]
    assert_losses_close(ddp_run["losses"], single["plain"]["losses"], RTOL)


@pytest.mark.slow
def test_zero3_trl_qrpo_on_two_nodes_gives_the_losses_of_one_process(single, multinode_run):
    assert_losses_close(multinode_run["losses"], single["plain"]["losses"], RTOL)
    assert (multinode_run["output_dir"] / "model.safetensors").is_file()  # gathered from the shards when saved


@pytest.mark.slow
def test_zero3_shards_the_policy_and_the_reference_model(stopped_run):
    for process in stopped_run["processes"]:
        assert process["world_size"] == 2 and process["deepspeed"] and process["zero_stage"] == 3
        assert process["has_ref_model"]
        assert process["policy_held_fraction"] == pytest.approx(0.5, abs=0.01)
        assert process["ref_held_fraction"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.slow
def test_zero3_run_stopped_and_resumed_gives_the_uninterrupted_losses(single, multinode_run, stopped_run, resumed_run):
    assert stopped_run["global_step"] == 2 and sorted(stopped_run["losses"]) == ["1", "2"]
    assert_losses_close(stopped_run["losses"], multinode_run["losses"], RTOL_RESUME, steps=["1", "2"])
    assert_losses_close(resumed_run["losses"], multinode_run["losses"], RTOL_RESUME, steps=["3", "4"])
    assert_losses_close(resumed_run["losses"], single["plain"]["losses"], RTOL)


@pytest.mark.slow
def test_zero3_precompute_keeps_no_reference_model(work, tiny_model_dir, single, deepspeed_cpu_op):
    # An in-memory dataset (Dataset.from_list): each process caches it in its own temporary folder, so the reference
    # log-probs cannot be handed over through a cache file written by the main process (TRL's DPOTrainer fails so).
    run = _zero3("zero3_precompute", work, None, tiny_model_dir, "--precompute_ref_log_probs", "true")
    for process in run["processes"]:
        # The reference log-probs came from the policy's own shards before the first update (a ZeRO-3 inference
        # engine over the same parameters); no reference model is built or kept for training.
        assert not process["has_ref_model"] and process["ref_held_fraction"] is None
        assert process["policy_held_fraction"] == pytest.approx(0.5, abs=0.01)
    assert_losses_close(run["losses"], single["plain"]["losses"], RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("separate_reference", [False, True], ids=["adapters-off", "separate-reference"])
def test_zero3_lora(work, rows, tiny_model_dir, single, deepspeed_cpu_op, separate_reference):
    extra = ["--lora", "--ref_model"] if separate_reference else ["--lora"]
    run = _zero3(f"zero3_lora_{separate_reference}", work, rows, tiny_model_dir, *extra)
    for process in run["processes"]:
        assert process["has_ref_model"] is separate_reference
        assert process["policy_held_fraction"] == pytest.approx(0.5, abs=0.01)
        if separate_reference:
            assert process["ref_held_fraction"] == pytest.approx(0.5, abs=0.01)
    assert_losses_close(run["losses"], single["lora"]["losses"], RTOL)


# ---------------------------------------------------------------- QRPOConfig on a multi-process launch without a GPU


def _launch_env(monkeypatch, world_size=2, deepspeed=False, local_rank=True):
    for name in ("LOCAL_RANK", "WORLD_SIZE", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    if local_rank:
        monkeypatch.setenv("LOCAL_RANK", "0")
    if deepspeed:
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")


def _args(**kwargs):
    return SimpleNamespace(**{"ddp_backend": None, "use_cpu": False, "deepspeed": None, "fsdp": None, **kwargs})


@pytest.mark.parametrize(
    "deepspeed, gpu, local_rank, preset, expected",
    [
        (True, False, True, {}, {"ddp_backend": "gloo", "use_cpu": False}),  # DeepSpeed on CPUs: gloo
        (False, False, True, {}, {"ddp_backend": None, "use_cpu": True}),  # DDP on CPUs: accelerate's multi-CPU mode
        (True, True, True, {}, {"ddp_backend": None, "use_cpu": False}),  # a GPU: untouched
        (False, True, True, {}, {"ddp_backend": None, "use_cpu": False}),
        (True, False, False, {}, {"ddp_backend": None, "use_cpu": False}),  # the launcher's own process (trl qrpo)
        (True, False, True, {"ddp_backend": "mpi"}, {"ddp_backend": "mpi", "use_cpu": False}),  # the user's choice
        (False, False, True, {"fsdp": "full_shard"}, {"ddp_backend": None, "use_cpu": False}),  # FSDP: untouched
    ],
)
def test_cpu_only_launch_defaults(monkeypatch, deepspeed, gpu, local_rank, preset, expected):
    from trl_qrpo import distributed

    _launch_env(monkeypatch, deepspeed=deepspeed, local_rank=local_rank)
    monkeypatch.setattr(distributed, "_has_accelerator", lambda: gpu)
    args = _args(**preset)
    distributed.set_up_cpu_only_launch(args)
    assert {"ddp_backend": args.ddp_backend, "use_cpu": args.use_cpu} == expected


def test_a_launch_whose_processes_did_not_join_is_refused(monkeypatch, tmp_path):
    """Without the launcher's defaults, 2 launched processes each see a 1-process accelerate state on a CPU machine."""
    import torch
    from accelerate import PartialState

    from trl_qrpo import QRPOConfig, distributed

    _launch_env(monkeypatch)
    monkeypatch.setattr(distributed, "_has_accelerator", lambda: False)
    # accelerate starts torch's default group (the other rank never comes here) and then counts 1 process anyway.
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *args, **kwargs: None)
    try:
        args = QRPOConfig(output_dir=str(tmp_path), bf16=False, report_to="none")  # what a plain DPOConfig does
        # The config itself changes no launch setting (the launcher does, before building it) ...
        assert (args.ddp_backend, args.use_cpu) == (None, False)
        # ... and the launcher refuses the result.
        with pytest.raises(ValueError, match="2 processes were launched .* accelerate set up 1 process"):
            distributed.check_every_launched_process_joined(args)
    finally:
        PartialState._reset_state()
    state = SimpleNamespace(distributed_state=SimpleNamespace(num_processes=2, distributed_type=_deepspeed_type()))
    distributed.check_every_launched_process_joined(state)  # a healthy launch passes


def _deepspeed_type():
    from accelerate.utils import DistributedType

    return DistributedType.DEEPSPEED


@pytest.mark.parametrize(
    "deepspeed, argv, yaml_text, expected",
    [
        (True, [], None, {"ddp_backend": "gloo"}),
        (False, [], None, {"use_cpu": True}),
        (True, ["--ddp_backend", "mpi"], None, {}),  # the user's choice, on the command line
        (False, ["--use_cpu=true"], None, {}),
        (False, ["--use_cpu", "false"], None, {"use_cpu": True}),  # the unset value
        (True, [], "ddp_backend: ccl\n", {}),  # or in the YAML config
        (False, [], "fsdp: full_shard\n", {}),  # FSDP: untouched
        (False, ["--deepspeed", "ds.json"], None, {"ddp_backend": "gloo"}),  # torchrun --deepspeed: DeepSpeed too
    ],
)
def test_launcher_defaults_from_the_command_line_and_yaml(monkeypatch, tmp_path, deepspeed, argv, yaml_text, expected):
    from transformers import HfArgumentParser

    from trl_qrpo import QRPOConfig, distributed

    _launch_env(monkeypatch, deepspeed=deepspeed)
    monkeypatch.setattr(distributed, "_has_accelerator", lambda: False)
    if yaml_text is not None:
        (tmp_path / "recipe.yaml").write_text(yaml_text)
        argv = [*argv, "--config", str(tmp_path / "recipe.yaml")]
    assert distributed.cpu_only_launch_defaults(argv) == expected
    parser = HfArgumentParser(QRPOConfig)
    assert distributed.apply_cpu_only_launch_defaults(parser, argv) == expected
    for name, value in expected.items():  # the parser would build the config with them
        assert parser.get_default(name) == value
    _launch_env(monkeypatch, world_size=1, local_rank=False)  # a single process: nothing
    assert distributed.cpu_only_launch_defaults(argv) == {}
