"""The experiment's reward: VADER sentiment of the completion text, a deterministic pointwise reward in [-1, 1].

VADER (Hutto & Gilbert, 2014; the dependency-free `nltk-vader-sentiment` package, imported as `vader`) scores a text
with a sentiment lexicon and a few rules (negation, intensifiers, punctuation); `compound` is the normalised sum,
from -1 (most negative) to +1 (most positive), and exactly 0 for a text without sentiment words. The task it defines,
"answer the same prompts, but more positively", has a real absolute reward that needs no trained reward model.

The signature is TRL's reward-function signature (``prompts, completions, **kwargs -> list[float]``), so the same
function scores the references (`trl_qrpo.reference.score_dataset`), evaluates policies
(`trl_qrpo.reference.evaluate_policy`), and could drive TRL's GRPOTrainer.
"""

from __future__ import annotations

_ANALYZER = None


def _analyzer():
    global _ANALYZER
    if _ANALYZER is None:
        import vader

        _ANALYZER = vader.SentimentIntensityAnalyzer()
    return _ANALYZER


def completion_text(completion) -> str:
    """The text of a completion given as a string or as a list of chat messages (the last message's content)."""
    if isinstance(completion, list):
        return completion[-1]["content"] if completion else ""
    return completion


def vader_sentiment(prompts, completions, **kwargs) -> list[float]:
    """VADER compound sentiment of each completion, in [-1, 1] (the prompt is not scored)."""
    analyzer = _analyzer()
    return [float(analyzer.polarity_scores(completion_text(c))["compound"]) for c in completions]
