import sys
from pathlib import Path

# Nothing in the tests may reach the Hugging Face Hub.
from trl_qrpo.offline import use_offline_defaults

use_offline_defaults()

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
