"""Ready-made reward functions with TRL's signature, `f(prompts, completions, **kwargs) -> list[float]`.

They plug into `trl qrpo score` / `trl qrpo evaluate` (`--reward_funcs trl_qrpo.rewards.vader_sentiment`), into
`trl_qrpo.precompute.score_dataset(..., reward_funcs=[vader_sentiment])`, and into TRL's own trainers
(`GRPOTrainer(reward_funcs=vader_sentiment, ...)`), for plain-text and conversational completions alike.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Sequence

logger = logging.getLogger("trl_qrpo.rewards")

VADER_PIP = "nltk-vader-sentiment"


def completion_text(completion) -> str:
    """The text of a completion: a string as it is, or the content of the assistant messages of a conversational one.

    Args:
        completion (`str` or `list[dict]`):
            A plain-text completion, or TRL's conversational form `[{"role": "assistant", "content": ...}]` (content
            as a string or as a list of `{"type": "text", "text": ...}` parts; messages without a role count as the
            assistant's).

    Returns:
        `str`: the text (messages joined with a newline).
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if not isinstance(completion, Sequence):
        raise TypeError(f"A completion is a string or a list of messages, got {type(completion).__name__}.")
    texts = []
    for message in completion:
        if not isinstance(message, dict) or "content" not in message:
            raise TypeError(
                f"A conversational completion is a list of {{'role', 'content'}} messages, got {message!r}."
            )
        if message.get("role", "assistant") != "assistant":
            continue
        content = message["content"]
        if isinstance(content, str):
            texts.append(content)
        elif content is not None:  # multimodal form: a list of parts
            texts.extend(
                part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
            )
    return "\n".join(texts)


def vader_sentiment(prompts=None, completions=None, **kwargs) -> list[float]:
    """Sentiment of each completion: VADER's compound score, in [-1, 1] (positive text scores high).

    VADER (Hutto and Gilbert, 2014) is a lexicon- and rule-based sentiment analyser: deterministic, CPU-only, about
    0.1 ms per sentence. It needs `pip install nltk-vader-sentiment` (imported as `vader`; no downloads). Only the
    completion is scored, never the prompt. An empty completion scores 0.

    Args:
        prompts (`list`, *optional*):
            The prompts (unused; part of TRL's signature).
        completions (`list[str]` or `list[list[dict]]`):
            Plain-text completions, or conversational ones (`[{"role": "assistant", "content": ...}]`).
        **kwargs:
            Other dataset columns and trainer arguments that TRL passes to reward functions (ignored).

    Returns:
        `list[float]`: one compound score per completion.

    Example:
    ```python
    >>> from trl_qrpo.rewards import vader_sentiment
    >>> vader_sentiment(completions=["What a lovely day!", "This is awful."])
    [0.6239, -0.4588]
    ```
    """
    if completions is None:
        raise TypeError("vader_sentiment needs `completions`.")
    try:
        import vader
    except ImportError as error:
        raise ImportError(
            f"The VADER sentiment reward needs the `{VADER_PIP}` package: pip install {VADER_PIP}"
        ) from error
    return [float(vader.polarity_scores(completion_text(c))["compound"]) for c in completions]


@functools.lru_cache(maxsize=4096)
def _tests_of(test: str) -> tuple[str, ...]:
    from .sandbox import split_tests

    return tuple(split_tests(test))


def _column(values, name: str, count: int, required: bool):
    if values is None:
        if required:
            raise ValueError(
                f"code_pass_rate needs the dataset column '{name}' "
                + (
                    "(Python source defining `check(candidate)` made of asserts, HumanEval / LeetCodeDataset format)"
                    if name == "test"
                    else "(the expression naming the function under test, e.g. 'add' or 'Solution().twoSum')"
                )
                + ": add it to the prompts dataset (see recipes/humaneval/prepare_data.py)."
            )
        return [None] * count
    values = list(values)
    if len(values) != count:
        raise ValueError(f"code_pass_rate got {len(values)} values of column '{name}' for {count} completions.")
    return values


class CodePassRate:
    """The `code_pass_rate` reward with a given sandbox configuration (see [`make_code_pass_rate`]).

    The sandbox is started on the first call (it probes the isolation available and logs it) and reused.
    """

    def __init__(self, config=None):
        from .sandbox import CodeSandboxConfig

        self.config = config if config is not None else CodeSandboxConfig.from_env()
        # the name trainers and `trl qrpo score` log the reward under
        self.__name__ = self.__qualname__ = "code_pass_rate"
        self._sandbox = None
        self._lock = threading.Lock()

    def __getstate__(self):  # picklable (datasets.map, multiprocessing): the sandbox is rebuilt where it lands
        return {"config": self.config}

    def __setstate__(self, state):
        self.__init__(state["config"])

    def __repr__(self) -> str:
        return f"CodePassRate({self.config!r})"

    @property
    def sandbox(self):
        with self._lock:
            if self._sandbox is None:
                from .sandbox import CodeSandbox

                self._sandbox = CodeSandbox(self.config)
            return self._sandbox

    def programs(self, completions, test, entry_point, imports=None) -> list:
        """The [`~trl_qrpo.sandbox.Program`] of each completion (validates the columns; runs nothing)."""
        from .sandbox import Program, extract_code

        if completions is None:
            raise TypeError("code_pass_rate needs `completions`.")
        n = len(completions)
        tests = _column(test, "test", n, True)
        entry_points = _column(entry_point, "entry_point", n, True)
        headers = _column(imports, "imports", n, False)
        programs = []
        for i in range(n):
            where = f"row {i} of this batch of {n} completions"
            if not isinstance(tests[i], str) or not tests[i].strip():
                raise ValueError(
                    f"Column 'test', {where}: expected Python source defining check(candidate), got "
                    f"{tests[i]!r}. Fix or drop this row."
                )
            if not isinstance(entry_points[i], str) or not entry_points[i].strip():
                raise ValueError(
                    f"Column 'entry_point', {where}: expected the name of the function under test, got "
                    f"{entry_points[i]!r}. Fix or drop this row."
                )
            if headers[i] is not None and not isinstance(headers[i], str):
                raise ValueError(f"Column 'imports', {where}: expected Python source (or null), got {headers[i]!r}.")
            try:
                units = list(_tests_of(tests[i]))
            except (SyntaxError, ValueError, RecursionError, MemoryError) as error:
                raise ValueError(
                    f"Column 'test', {where}: {error}. The tests must be Python source defining check(candidate) "
                    "with asserts (HumanEval / LeetCodeDataset format); fix or drop this row."
                ) from error
            code = extract_code(completion_text(completions[i]), self.config.code_block)
            if code is not None and headers[i]:
                code = headers[i].rstrip("\n") + "\n\n" + code
            programs.append(Program(code, units, entry_points[i].strip(), header=headers[i] or ""))
        return programs

    def __call__(self, prompts=None, completions=None, test=None, entry_point=None, imports=None, **kwargs):
        programs = self.programs(completions, test, entry_point, imports)
        results = self.sandbox.run(programs)
        counts = {}
        for result in results:
            for status in result.statuses:
                counts[status] = counts.get(status, 0) + 1
        logger.info(f"code_pass_rate: {len(results)} solutions, test outcomes {counts}")
        broken = [r for r in results if "error" in r.statuses]
        if broken:
            logger.warning(
                f"code_pass_rate: {len(broken)} of {len(results)} solutions ended without an answer from the sandbox "
                f"(killed by their own code, or a sandbox failure; their tests count as failed): {broken[0].detail}"
            )
        return [r.pass_rate for r in results]


def make_code_pass_rate(config=None, **overrides) -> CodePassRate:
    """A `code_pass_rate` reward function with the given sandbox options.

    Args:
        config ([`~trl_qrpo.sandbox.CodeSandboxConfig`], *optional*):
            The options; default: `CodeSandboxConfig.from_env()` (environment variables `TRL_QRPO_SANDBOX_*`).
        **overrides: fields of `CodeSandboxConfig` to change (e.g. `backend="bwrap", require_full_isolation=True`).

    Example:
    ```python
    >>> from trl_qrpo.rewards import make_code_pass_rate
    >>> reward = make_code_pass_rate(backend="bwrap", require_full_isolation=True, num_workers=8)
    >>> # GRPOTrainer(reward_funcs=reward, ...), or score_dataset(..., reward_funcs=[reward])
    ```
    """
    import dataclasses

    from .sandbox import CodeSandboxConfig

    config = config if config is not None else CodeSandboxConfig.from_env()
    if overrides:
        config = dataclasses.replace(config, **overrides)
    return CodePassRate(config)


_DEFAULT_PASS_RATE: dict = {}
_DEFAULT_LOCK = threading.Lock()


def code_pass_rate(prompts=None, completions=None, test=None, entry_point=None, imports=None, **kwargs) -> list[float]:
    """Fraction of a problem's tests that a completion's code passes, run in a sandbox (the QRPO paper's LeetCode reward).

    The solution is the completion's fenced ```python block (the first one; `code_block` option); a completion
    without a complete block scores 0. The optional `imports` header is put before it. `test` defines
    `check(candidate)`; each of its top-level statements holding an `assert` is one test, run in its own processes on
    `eval(entry_point)` (a loop of asserts is one test; the statements before a test that are not tests are its
    set-up; see `trl_qrpo.sandbox.split_tests`). The test and the solution run in two sandboxes: `check` never runs
    in the solution's interpreter, and only plain data (arguments in, the return value out) crosses, so nothing the
    solution does but returning right answers makes a test pass. The reward is passed tests / tests, in [0, 1]; a
    syntax error, a crash, a timeout or a return value that is not plain data fails the tests it affects and never
    raises. Tests run in parallel sandboxes (bubblewrap when installed, else a locked-down subprocess: no network,
    read-only file system except a size-limited tmpfs, empty environment, memory / CPU / process limits); see
    docs/code-rewards.md.

    Options come from environment variables `TRL_QRPO_SANDBOX_<FIELD>` (fields of
    `trl_qrpo.sandbox.CodeSandboxConfig`: `BACKEND`, `REQUIRE_FULL_ISOLATION`, `CPU_TIME_LIMIT`, `TEST_TIMEOUT`,
    `TIMEOUT`, `MEMORY_MB`, `MAX_PROCESSES`, `NUM_WORKERS`, `CODE_BLOCK`, ...), read on the first call; in Python,
    [`make_code_pass_rate`] takes them as a config instead.

    Args:
        prompts (`list`, *optional*): the prompts (unused).
        completions (`list[str]` or `list[list[dict]]`): plain-text or conversational completions.
        test (`list[str]`): per completion, the tests: Python source defining `check(candidate)`.
        entry_point (`list[str]`): per completion, the function under test (`"add"`, `"Solution().twoSum"`).
        imports (`list[str]`, *optional*): per completion, code put before the solution (e.g. LeetCodeDataset's
            import header, or HumanEval's prompt with its helper functions).
        **kwargs: other columns and trainer arguments (ignored).

    Returns:
        `list[float]`: one pass rate per completion.

    Example:
    ```python
    >>> from trl_qrpo.rewards import code_pass_rate
    >>> test = "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(2) == 4\n"
    >>> code_pass_rate(completions=["```python\ndef f(x):\n    return x + 1\n```"], test=[test], entry_point=["f"])
    [0.5]
    ```
    """
    from .sandbox import CodeSandboxConfig

    config = CodeSandboxConfig.from_env()
    key = repr(config)
    with _DEFAULT_LOCK:
        reward = _DEFAULT_PASS_RATE.get(key)
        if reward is None:
            reward = _DEFAULT_PASS_RATE[key] = CodePassRate(config)
    return reward(prompts, completions, test=test, entry_point=entry_point, imports=imports, **kwargs)


__all__ = ["CodePassRate", "code_pass_rate", "completion_text", "make_code_pass_rate", "vader_sentiment"]
