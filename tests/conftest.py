import os
import sys
from pathlib import Path

# Nothing in the tests may reach the Hugging Face Hub: set before transformers, datasets or huggingface_hub are
# imported (they read these at import time). Values already set win.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_DISABLED": "true",
    "TQDM_DISABLE": "1",
}
for _name, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_name, _value)

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import build_tokenizer, save_tiny_causal_lm, save_tiny_reward_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny LlamaForCausalLM and its tokenizer, saved once per session."""
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_reward_model_dir(tmp_path_factory) -> Path:
    """A tiny LlamaForSequenceClassification (random head) and its tokenizer, saved once per session."""
    return save_tiny_reward_model(tmp_path_factory.mktemp("tiny-llama-rm"))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()
