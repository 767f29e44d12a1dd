"""Ready-made reward functions with TRL's signature, `f(prompts, completions, **kwargs) -> list[float]`.

They plug into `trl qrpo score` / `trl qrpo evaluate` (`--reward_funcs trl_qrpo.rewards.vader_sentiment`), into
`trl_qrpo.reference.score_dataset(..., reward_funcs=[vader_sentiment])`, and into TRL's own trainers
(`GRPOTrainer(reward_funcs=vader_sentiment, ...)`), for plain-text and conversational completions alike.
"""

from __future__ import annotations

from collections.abc import Sequence

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


__all__ = ["completion_text", "vader_sentiment"]
