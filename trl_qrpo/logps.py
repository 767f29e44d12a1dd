"""Sequence log-probabilities: the one place where log pi(completion | prompt) is computed.

The trainer (policy and reference log-probs of each collated batch) and the pre-computation (`evaluate`'s log-ratios,
`ref-logps`) use the same three steps, so that a log-ratio reported after training and the log-ratio training
regressed are computed the same way on the same tokens:

- :func:`model_inputs` and :func:`completion_labels`: what the model is given (only `input_ids`, `attention_mask`;
  some models silently accept unknown keywords such as `target=`), and labels that mask everything but the
  completion;
- the model runs with TRL's fused LM head (per-token log-probabilities without the full logits);
- :func:`sum_completion_logps`: the completion tokens' log-probabilities summed in float32 (a bf16 sum over thousands
  of tokens loses nats).

:func:`sequence_logps` does all three for lists of token ids, batching them with [`DataCollatorForQRPO`].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .collator import DataCollatorForQRPO
from .columns import COMPLETION_IDS, PROMPT_IDS


def model_inputs(inputs) -> dict:
    """Only what the model takes from a collated batch: some models accept unknown keywords (quantile=) silently."""
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "use_cache": False}


def completion_labels(inputs) -> torch.Tensor:
    """Labels of a collated batch: the input ids on completion tokens, -100 elsewhere."""
    return inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)


def sum_completion_logps(per_token_logps: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Sum per-token log-probs over completion tokens in fp32 (a bf16 sum over thousands of tokens loses nats)."""
    shift_mask = completion_mask[:, 1:]
    per_token = per_token_logps[:, -shift_mask.size(1) :].float()  # prompt-learning PEFT prepends virtual tokens
    return (per_token * shift_mask).sum(dim=1)


def ensure_fused_lm_head(model) -> None:
    """Give `model` TRL's fused LM head (`model(..., fused_lm_head=True)`), as DPOTrainer does for training."""
    if getattr(model, "_trl_qrpo_fused_lm_head", False):
        return
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model)
    model._trl_qrpo_fused_lm_head = True


def sequence_logps(
    model,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    batch_size: int = 8,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    progress=None,
) -> list[float]:
    """log p(completion | prompt) per sequence, as training computes it: the QRPO collator and fp32 sums.

    Sequences are batched by length (longest first) with [`DataCollatorForQRPO`], the model runs with TRL's fused
    LM head, and the completion tokens' log-probabilities are summed in float32 by :func:`sum_completion_logps`.

    Args:
        model ([`~transformers.PreTrainedModel`]): A causal LM.
        prompt_ids (`Sequence[Sequence[int]]`): Prompt token ids per sequence.
        completion_ids (`Sequence[Sequence[int]]`): Completion token ids per sequence (at least one each).
        pad_token_id (`int`): Padding id (masked out).
        batch_size (`int`, *optional*, defaults to `8`): Sequences per forward pass.
        max_length (`int`, *optional*), truncation_mode (`str`, defaults to `"keep_start"`): truncate each sequence
            as the training collator does (`QRPOConfig.max_length`, `truncation_mode`).
        progress (`Callable[[int], None]`, *optional*): Called with the number of sequences of each finished batch.

    Returns:
        `list[float]`: one log-probability per sequence.
    """
    ensure_fused_lm_head(model)
    collator = DataCollatorForQRPO(pad_token_id=pad_token_id, max_length=max_length, truncation_mode=truncation_mode)
    order = sorted(range(len(prompt_ids)), key=lambda i: -(len(prompt_ids[i]) + len(completion_ids[i])))
    out = [math.nan] * len(prompt_ids)
    device = model.device
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            inputs = collator(
                [{PROMPT_IDS: list(prompt_ids[i]), COMPLETION_IDS: [list(completion_ids[i])]} for i in batch]
            )
            inputs = {k: v.to(device) for k, v in inputs.items()}
            outputs = model(**model_inputs(inputs), labels=completion_labels(inputs), fused_lm_head=True)
            sums = sum_completion_logps(outputs.log_probs, inputs["completion_mask"])
            for i, value in zip(batch, sums.tolist(), strict=True):
                out[i] = value
            if progress is not None:
                progress(len(batch))
    return out
