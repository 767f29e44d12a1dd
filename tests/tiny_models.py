"""Tiny models and tokenizers built offline, for the tests (no Hub access).

`build_tokenizer()` trains a byte-level BPE in memory with the `tokenizers` library and wraps it in
`PreTrainedTokenizerFast` with pad/eos tokens and a ChatML chat template. `save_tiny_causal_lm()` and
`save_tiny_reward_model()` write a tiny Llama (causal LM or sequence-classification head) next to that
tokenizer, so every path that takes a model name or folder can be exercised.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The sky is blue and the sun is bright.",
    "A happy dog runs in the green park.",
    "What is the capital of France? Paris is the capital of France.",
    "I love this wonderful day, it is great and good.",
    "This is terrible, awful and bad.",
    "Write a short poem about the sea and the wind.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12.",
    "Tell me a story about a brave cat who found a treasure.",
    "def add(a, b):\n    return a + b\n",
    "user assistant system hello hi thanks please yes no",
]

SPECIAL_TOKENS = ["<pad>", "<|im_end|>", "<|im_start|>", "<unk>"]


def build_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained in memory: pad `<pad>`, eos `<|im_end|>`, ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def save_tiny_causal_lm(path: str | Path, seed: int = 0, **config_overrides) -> Path:
    """Save a tiny LlamaForCausalLM (hidden size 32, 2 layers) and its tokenizer to `path`."""
    import torch
    from transformers import LlamaForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer), **config_overrides))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_reward_model(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny LlamaForSequenceClassification (one label, random head) and its tokenizer to `path`."""
    import torch
    from transformers import LlamaForSequenceClassification

    path = Path(path)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(tiny_llama_config(len(tokenizer), num_labels=1))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
