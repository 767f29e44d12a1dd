"""DataCollatorForQRPO: one right-padded sequence per completion (the batch of training, evaluation and log-probs).

Used by the trainer and by every pre-computation stage that scores sequences (:mod:`trl_qrpo.logps`), so that the
tokens trained on and the tokens evaluated are laid out the same way. Imports no trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers.data.data_collator import DataCollatorMixin
from trl.trainer.utils import pad

from .columns import COMPLETION_IDS, PER_COMPLETION_FLOATS, PROMPT_IDS


@dataclass
class DataCollatorForQRPO(DataCollatorMixin):
    """
    Collator for QRPO rows: a prompt and k completions (k = 1 for pointwise data, 2 for both sides of a pair).

    Each completion becomes one sequence ``prompt + completion``, right-padded. Sequences are ordered side-major, as
    in TRL's DataCollatorForPreference: the first completion of every row, then the second, so that a paired batch
    of B rows is ``[chosen_1..chosen_B, rejected_1..rejected_B]``. Returns ``input_ids``, ``attention_mask``,
    ``completion_mask``, ``side`` (the completion's position in its row: 0 for pointwise rows and chosen, 1 for
    rejected) and, when present in the rows, the float fields ``target``, ``beta``, ``beta_log_z``, ``quantile``,
    ``reward`` and ``ref_logps``, one value per sequence.

    Args:
        pad_token_id (`int`): token used for padding.
        max_length (`int`, *optional*): truncate each prompt + completion to this many tokens.
        truncation_mode (`str`, defaults to `"keep_start"`): `"keep_start"` or `"keep_end"` (deprecated in TRL).
        pad_to_multiple_of (`int`, *optional*): pad the sequence length to a multiple of this value.
    """

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(
                f"Unsupported truncation mode: {self.truncation_mode}, expected 'keep_start' or 'keep_end'"
            )
        k = len(examples[0][COMPLETION_IDS])
        ids, completion_masks = [], []
        for j in range(k):
            for example in examples:
                prompt, completion = example[PROMPT_IDS], example[COMPLETION_IDS][j]
                seq = prompt + completion
                mask = [0] * len(prompt) + [1] * len(completion)
                if self.max_length is not None:
                    sl = (
                        slice(None, self.max_length)
                        if self.truncation_mode == "keep_start"
                        else slice(-self.max_length, None)
                    )
                    seq, mask = seq[sl], mask[sl]
                ids.append(torch.tensor(seq, dtype=torch.long))
                completion_masks.append(torch.tensor(mask, dtype=torch.long))
        kwargs = {"padding_side": "right", "pad_to_multiple_of": self.pad_to_multiple_of}
        output = {
            "input_ids": pad(ids, padding_value=self.pad_token_id, **kwargs),
            "attention_mask": pad([torch.ones_like(x) for x in ids], padding_value=0, **kwargs),
            "completion_mask": pad(completion_masks, padding_value=0, **kwargs),
        }
        output["side"] = torch.arange(k).repeat_interleave(len(examples))
        for key in PER_COMPLETION_FLOATS:
            if key in examples[0]:
                values = [example[key][j] for j in range(k) for example in examples]
                output[key] = torch.tensor([np.nan if v is None else v for v in values], dtype=torch.float32)
        return output
