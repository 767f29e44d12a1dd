"""trl_qrpo.logps: the one place where log pi(completion | prompt) is computed (training and the pre-computation)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from trl_qrpo.logps import sequence_logps, sum_completion_logps


def test_completion_log_probs_are_summed_in_fp32():
    # 4,000 tokens of about -0.37 each: a bf16 running sum has a resolution of whole nats at -1,500.
    per_token = torch.full((1, 4001), -0.3712, dtype=torch.bfloat16)
    mask = torch.ones(1, 4002, dtype=torch.long)
    total = sum_completion_logps(per_token, mask)
    exact = per_token.double().sum().item()
    assert total.dtype == torch.float32
    assert total.item() == pytest.approx(exact, abs=1e-2)
    assert abs(per_token.cumsum(dim=1, dtype=torch.bfloat16)[0, -1].item() - exact) > 1.0  # what fp32 avoids


def test_sequence_logps_equal_a_plain_log_softmax_of_the_logits(tiny_model_dir):
    """Against an independent computation: full logits, log-softmax in float64, completion tokens gathered one by
    one; batched by length with padding, in any order."""
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in (3, 7, 1, 5)]
    completions = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in (4, 1, 6, 2)]

    def by_hand(prompt, completion):
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()
        log_probs = torch.log_softmax(logits, dim=-1)
        return sum(log_probs[len(prompt) + i - 1, token].item() for i, token in enumerate(completion))

    got = sequence_logps(model, prompts, completions, pad_token_id=0, batch_size=3)
    expected = [by_hand(p, c) for p, c in zip(prompts, completions, strict=True)]
    assert got == pytest.approx(expected, abs=1e-4)
