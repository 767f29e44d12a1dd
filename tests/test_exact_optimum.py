"""The exact-optimum check (docs/math.md, "The exact-optimum check"): QRPOTrainer reaches pi* when, and only when,
log Z is exact.

One prompt; every completion is exactly one token and the completions enumerate the whole vocabulary, so the
enumerated set is the policy's entire support (sum of pi_theta over it is 1 by construction, and checked). pi_ref is
the initial model. The rewards are distinct, so the quantile of completion v under pi_ref is
q(v) = sum_{u: r(u) <= r(v)} pi_ref(u); since pi_ref is discrete, log Z is that of this discrete distribution,
Z = sum_v pi_ref(v) exp(f(q(v)) / beta), given to the trainer through a registered transform. Training on every
completion must bring KL(pi_theta || pi*) and the loss near zero; the same run with log Z offset cannot fit the
targets, because pi_theta has no mass to move outside the set.
"""

import copy
import math

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from tiny_models import tiny_llama_config
from trl_qrpo import QRPOConfig, QRPOTrainer
from trl_qrpo.transforms import Identity, register_transform

BETA = 1.0
VOCAB = ["<pad>", "<eos>", "Q"] + [f"a{i}" for i in range(13)]


def word_tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    # Messages are joined by spaces and nothing is added: the completion is exactly its one token.
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tokenizer


def policy_log_probs(model, tokenizer):
    prompt = torch.tensor([[tokenizer.convert_tokens_to_ids("Q")]])
    with torch.no_grad():
        logits = model(input_ids=prompt).logits[0, -1].double()
    return torch.log_softmax(logits, dim=-1)


def train_to_optimum(tmp_path, log_z_offset: float):
    tokenizer = word_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(VOCAB), pad_token_id=0, bos_token_id=2, eos_token_id=1))
    log_ref = policy_log_probs(model, tokenizer)  # pi_ref: the initial policy over the whole vocabulary
    assert math.isclose(log_ref.exp().sum().item(), 1.0, rel_tol=1e-9)

    rewards = torch.randn(len(VOCAB), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = log_ref.exp()
    quantiles = torch.stack([ref[rewards <= r].sum() for r in rewards]).clamp(max=1.0)
    log_z = torch.logsumexp(log_ref + quantiles / BETA, dim=0).item()  # exact for this discrete pi_ref
    log_pi_star = log_ref + quantiles / BETA - log_z

    class DiscreteIdentity(Identity):
        name = f"discrete-identity-{log_z_offset}"

        def log_partition(self, beta):
            assert beta == BETA
            return log_z + log_z_offset

    register_transform(DiscreteIdentity.name, DiscreteIdentity)
    dataset = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": "Q"}]] * len(VOCAB),
            "completion": [[{"role": "assistant", "content": w}] for w in VOCAB],
            "quantile": quantiles.tolist(),
        }
    )
    args = QRPOConfig(
        output_dir=str(tmp_path),
        transform=DiscreteIdentity.name,
        beta=BETA,
        learning_rate=3e-2,
        lr_scheduler_type="constant",
        max_steps=300,
        per_device_train_batch_size=len(VOCAB),
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=True,
        report_to="none",
        logging_steps=10,
        save_strategy="no",
        seed=0,
    )
    ref_model = copy.deepcopy(model)
    trainer = QRPOTrainer(
        model=model, ref_model=ref_model, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    lengths = {len(ids[0]) for ids in trainer.train_dataset["completion_ids"]}
    assert lengths == {1}, "every completion must be exactly one token"
    trainer.train()
    log_pi = policy_log_probs(trainer.model, tokenizer)
    assert math.isclose(log_pi.exp().sum().item(), 1.0, rel_tol=1e-9)  # the set is the whole support
    kl = (log_pi.exp() * (log_pi - log_pi_star)).sum().item()
    kl_start = (ref * (log_ref - log_pi_star)).sum().item()
    # The loss of the final parameters, over every completion.
    targets = torch.tensor(trainer.train_dataset["target"])[:, 0]
    final_loss = ((targets - BETA * (log_pi - log_ref).float()) ** 2).mean().item()
    return kl, kl_start, final_loss


@pytest.mark.slow
def test_exact_partition_function_reaches_the_optimum(tmp_path):
    kl, kl_start, loss = train_to_optimum(tmp_path / "exact", log_z_offset=0.0)
    assert kl_start > 0.02  # pi* is far enough from pi_ref for the check to mean something
    assert kl < 1e-4 * kl_start
    assert loss < 1e-6


@pytest.mark.slow
def test_offset_partition_function_cannot_reach_the_optimum(tmp_path):
    kl, kl_start, loss = train_to_optimum(tmp_path / "offset", log_z_offset=0.5)
    assert loss > 1e-3
    assert kl > 1e-3
