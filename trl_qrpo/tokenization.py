"""Tokenisation of prompts and completions: one rule for training and for sampling.

A prompt is tokenised exactly as DPOTrainer tokenises it for training: a conversational prompt gets the chat template
with the generation prompt (and the row's `tools` and `chat_template_kwargs`); a plain-text prompt is tokenised as
is. The pre-computation samples reference completions after exactly these prompt tokens
(:func:`tokenize_prompt`), and the trainer builds its sequences with the same function (:func:`tokenize_row`,
:func:`tokenize_batch`), so that the sampled and the trained prompt are the same tokens.

A text completion starts where the tokenised prompt and the tokenised prompt + completion first diverge (TRL's
boundary rule, `trl.data_utils.common_prefix_length`). Imports no trainer.
"""

from __future__ import annotations

import json

from transformers import ProcessorMixin
from transformers.utils import logging
from trl.data_utils import _tokenize, common_prefix_length, is_conversational

from .columns import (
    CHAT_TEMPLATE_KWARGS,
    COMPLETION_COLUMNS,
    COMPLETION_IDS,
    COMPLETIONS,
    PROMPT,
    PROMPT_IDS,
    SAMPLED_IDS,
    TOOLS,
)

logger = logging.get_logger(__name__)


def template_kwargs(example: dict) -> dict:
    """The chat-template arguments a row carries: its `tools` (a list, or JSON text) and `chat_template_kwargs`."""
    tools = example.get(TOOLS)
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return {"tools": tools, **(example.get(CHAT_TEMPLATE_KWARGS) or {})}


def check_one_format(dataset, columns=(PROMPT, *COMPLETION_COLUMNS)) -> None:
    """Refuse a dataset whose prompts and completions mix the plain-text and conversational formats.

    A data file can hold both (`datasets` then types the column as `Json`); tokenising such a row fails deep inside
    the chat template. The first row that differs from row 0 is named, with its column and the fix. Columns typed as
    strings or as lists of messages hold one format by construction and are not scanned.
    """
    from datasets import Value

    features = getattr(dataset, "features", None) or {}
    first_kind, first_where = None, None
    for column in columns:
        if column not in features:
            continue
        feature = features[column]
        if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
            kinds = None
            kind = "plain text"
        elif isinstance(feature, list) or type(feature).__name__ == "List":
            kinds = None
            kind = "conversational"
        else:  # Json or another mixed type: look at every row
            kinds = ["conversational" if isinstance(v, list) else "plain text" for v in dataset[column]]
            kind = kinds[0] if kinds else None
        if kind is None:
            continue
        if first_kind is None:
            first_kind, first_where = kind, f"column '{column}', row 0"
        odd = [i for i, k in enumerate(kinds or []) if k != first_kind]
        if kind != first_kind or odd:
            row = odd[0] if odd else 0
            raise ValueError(
                f"Column '{column}', row {row} (0-based; line {row + 1} of a JSON-lines file) is "
                f"{'plain text' if first_kind == 'conversational' else 'conversational'}, but {first_where} is "
                f"{first_kind}. Use one format for every prompt and completion: plain strings, or lists of "
                "{'role', 'content'} messages (TRL's conversational format)."
            )


def tokenize_prompt(processing_class, example: dict) -> list[int]:
    """Token ids of a row's prompt, exactly as training tokenises prompts (see the module docstring)."""
    prompt = example[PROMPT]
    if is_conversational({"prompt": prompt}):
        ids = _tokenize(processing_class, prompt, add_generation_prompt=True, **template_kwargs(example))
        return list(ids["input_ids"])
    if not isinstance(prompt, str):
        raise ValueError(
            f"Column '{PROMPT}' holds a {type(prompt).__name__}; expected a string or a list of "
            "{'role', 'content'} messages."
        )
    return list(_tokenize(processing_class, prompt)["input_ids"])


def completion_start(prompt_ids: list[int], full: list[list[int]]) -> int:
    """TRL's boundary rule: the completion starts where the prompt and every prompt+completion first diverge."""
    n = len(prompt_ids)
    if all(ids[:n] == prompt_ids for ids in full):  # the usual case, compared at C speed
        return n
    return min(common_prefix_length(prompt_ids, ids) for ids in full)


def _warn_boundary(processing_class, prompt_ids, prompt_len):
    logger.warning_once(
        "The tokenized prompt is not a prefix of the tokenized prompt+completion (the chat template renders the "
        "prompt alone differently, or tokens merge across the boundary). The completion starts where they "
        f"diverge; this end of the prompt is left out: {processing_class.decode(prompt_ids[prompt_len:])!r}."
    )


def _with_eos(completions: list[str], eos_token: str | None) -> list[str]:
    if eos_token is None:
        return completions
    return [c if c.endswith(eos_token) else c + eos_token for c in completions]


def _split(processing_class, prompt_ids: list[int], full: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    prompt_len = completion_start(prompt_ids, full)
    if prompt_len < len(prompt_ids):
        _warn_boundary(processing_class, prompt_ids, prompt_len)
    return prompt_ids[:prompt_len], [ids[prompt_len:] for ids in full]


def tokenize_row(example, processing_class, eos_token):
    """Tokenize a prompt and its completions (`completions`, a list); the completion starts where prompt and
    prompt+completion diverge. Plain-text completions get `eos_token` appended unless they end with it.

    A completion that comes with the token ids it was sampled as (`sampled_ids`, from `trl qrpo generate`) is not
    tokenised again: its sequence is the prompt, tokenised as the sampler tokenised it, followed by exactly those ids
    (a truncated sample gets no end-of-turn it never produced; one that stopped keeps exactly its stop token).

    The per-row path (TRL's `_tokenize`, as DPOTrainer): used for processors, for rows with their own tools or
    chat-template arguments and for sampled ids; :func:`tokenize_batch` gives the same ids for whole batches.
    """
    prompt, completions = example[PROMPT], example[COMPLETIONS]
    sampled = example.get(SAMPLED_IDS) or [None] * len(completions)
    prompt_ids = tokenize_prompt(processing_class, example)
    texts = [c for c, ids in zip(completions, sampled, strict=True) if ids is None]
    if is_conversational({"prompt": prompt}):
        kwargs = template_kwargs(example)
        full = [_tokenize(processing_class, prompt + c, **kwargs)["input_ids"] for c in texts]
    else:
        full = [_tokenize(processing_class, prompt + c)["input_ids"] for c in _with_eos(texts, eos_token)]
    cut, text_ids = _split(processing_class, prompt_ids, full) if full else (prompt_ids, [])
    moved = prompt_ids[len(cut) :]  # prompt tokens the boundary rule gave to the text completions (usually none)
    text_ids = iter(text_ids)
    completion_ids = [moved + list(ids) if ids is not None else next(text_ids) for ids in sampled]
    return {PROMPT_IDS: cut, COMPLETION_IDS: completion_ids}


def tokenize_batch(batch, processing_class, eos_token):
    """:func:`tokenize_row` for a batch: one tokenizer call for the prompts and one for the prompt+completions.

    The same calls as the per-row path, on lists (`apply_chat_template` on a list of conversations renders and
    tokenizes each exactly as alone; a tokenizer on a list of strings encodes each as alone), so the ids are identical.
    Processors, and rows carrying their own tools or chat-template arguments, take the per-row path.
    """
    prompts, completions = batch[PROMPT], batch[COMPLETIONS]
    per_row_kwargs = any(v is not None for key in (TOOLS, CHAT_TEMPLATE_KWARGS) for v in batch.get(key, ()))
    sampled = any(ids is not None for row in batch.get(SAMPLED_IDS) or () for ids in row or ())
    if isinstance(processing_class, ProcessorMixin) or per_row_kwargs or sampled or not prompts:
        rows = [
            tokenize_row({key: batch[key][i] for key in batch}, processing_class, eos_token)
            for i in range(len(prompts))
        ]
        return {PROMPT_IDS: [r[PROMPT_IDS] for r in rows], COMPLETION_IDS: [r[COMPLETION_IDS] for r in rows]}
    counts = [len(cs) for cs in completions]
    if is_conversational({"prompt": prompts[0]}):
        prompt_ids = processing_class.apply_chat_template(
            prompts, tokenize=True, return_dict=True, add_generation_prompt=True, tools=None
        )["input_ids"]
        joined = [p + c for p, cs in zip(prompts, completions, strict=True) for c in cs]
        flat = processing_class.apply_chat_template(joined, tokenize=True, return_dict=True, tools=None)["input_ids"]
    else:
        prompt_ids = processing_class(text=prompts)["input_ids"]
        texts = [p + c for p, cs in zip(prompts, completions, strict=True) for c in _with_eos(cs, eos_token)]
        flat = processing_class(text=texts)["input_ids"]
    out_prompts, out_completions, at = [], [], 0
    for ids, count in zip(prompt_ids, counts, strict=True):
        prompt, completion = _split(processing_class, ids, flat[at : at + count])
        at += count
        out_prompts.append(prompt)
        out_completions.append(completion)
    return {PROMPT_IDS: out_prompts, COMPLETION_IDS: out_completions}


def prompt_fits(prompt_ids, max_length):
    """Filter: rows whose prompt leaves room for at least one completion token under `keep_start` truncation."""
    return [len(ids) < max_length for ids in prompt_ids]
