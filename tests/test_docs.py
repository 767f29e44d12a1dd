"""Every Python example of README.md and docs/*.md runs, so that the documentation cannot rot.

How it works:
- Each fenced block whose language is `python` (or `py`) in README.md and in the top-level pages of docs/ is one
  test, named `page.md:line`. It is executed as is, in a fresh namespace, in a temporary working directory (blocks
  write `output_dir`s and the like there), with the Hub offline as in every test.
- Model ids become tiny offline models: every string literal of `HUB_MODELS` in a block (e.g.
  `"Qwen/Qwen2-0.5B-Instruct"`) is replaced by the path of a tiny Llama built in memory (the `tiny_model_dir` and
  `tiny_reward_model_dir` fixtures of conftest.py). A page may therefore name the real models a user would use; add
  a new id to `HUB_MODELS` when a page uses one. Blocks that load such a model are marked `slow`.
- A block that cannot run offline on a CPU (it needs a GPU, the Hub, a big model, a file the reader has) is marked by
  an HTML comment on the line just before its opening fence, which renders as nothing:

      <!-- docs-test: skip (needs the Hub) -->

  Such blocks are reported as skipped with that reason, and counted by `test_every_block_is_run_or_marked`. Any
  other block that raises fails its test. A skip marker must have a reason and must sit right before a Python block.
- Blocks are independent: none may rely on a variable of an earlier block.
"""

from __future__ import annotations

import importlib.util
import re
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
MARKER = re.compile(r"^<!--\s*docs-test:\s*(?P<directive>.*?)\s*-->$")
SKIP = re.compile(r"^skip\s*\((?P<reason>.+)\)$")
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


def _uses_a_model(block: Block) -> bool:
    return any(f'"{name}"' in block.code or f"'{name}'" in block.code for name in HUB_MODELS)


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
    for name, kind in HUB_MODELS.items():
        if f'"{name}"' in code or f"'{name}'" in code:
            fixture = "tiny_model_dir" if kind == "causal_lm" else "tiny_reward_model_dir"
            local = repr(str(request.getfixturevalue(fixture)))
            code = code.replace(f'"{name}"', local).replace(f"'{name}'", local)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    exec(compile(code, block.id, "exec"), namespace)  # noqa: S102 - the documentation's own examples


def test_every_block_is_run_or_marked(capsys):
    """Counts the Python blocks: run, or skipped with a reason; markers must be well formed and placed."""
    assert len(PYTHON_BLOCKS) >= 6, "the README and the trainer, pre-computation pages have Python examples"
    for block in ALL_BLOCKS:
        if block.directive is None:
            continue
        if block.directive.startswith("skip"):
            assert block.skip_reason, f"{block.id}: write the reason: <!-- docs-test: skip (needs a GPU) -->"
            assert block.is_python, f"{block.id}: a skip marker before a {block.lang or 'plain'} block means nothing"
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
    with capsys.disabled():
        print(f"\ndocs: {len(PYTHON_BLOCKS)} Python blocks, {len(runnable)} run, {len(skipped)} marked skipped")
        for block in skipped:
            print(f"  skipped {block.id}: {block.skip_reason}")


def test_parser_reads_markers_fences_and_languages(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n<!-- docs-test: skip (needs a GPU) -->\n```python\nimport torch\n```\n\n"
        "```bash\nls\n```\n- item:\n  ```py\n  x = 1\n  ```\n"
    )
    blocks = parse_blocks(page)
    assert [(b.line, b.lang, b.skip_reason) for b in blocks] == [
        (3, "python", "needs a GPU"),
        (7, "bash", None),
        (11, "py", None),
    ]
    assert blocks[0].code == "import torch\n" and blocks[2].code == "x = 1\n", "indented blocks are dedented"
    assert [b.is_python for b in blocks] == [True, False, True]


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
