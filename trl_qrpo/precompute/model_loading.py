"""Loading the models and tokenizers of the pre-computation (reference model, policy, reward model) in eval mode.

Shared by every stage and backend; imports no stage. A model can always be given already loaded instead of by name.
"""

from __future__ import annotations

import os
from pathlib import Path

from .io import model_name


def resolve_device(device: str | None) -> str:
    """`device`, or for `"auto"`/None the device accelerate assigns this process (its local GPU under a launcher,
    CUDA/XPU/NPU/MPS when available, else the CPU)."""
    if device in (None, "auto"):
        from accelerate import PartialState

        return str(PartialState().device)
    return device


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, revision: str | None = None):
    """`AutoTokenizer.from_pretrained`, with the pad token falling back to EOS as in DPOTrainer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_tokenizer(processing_class, model, *, trust_remote_code: bool = False, revision: str | None = None):
    """The given tokenizer, or the one saved with `model` (pad token falling back to EOS)."""
    if processing_class is not None:
        if isinstance(processing_class, str):
            return load_tokenizer(processing_class, trust_remote_code=trust_remote_code, revision=revision)
        if processing_class.pad_token is None:
            processing_class.pad_token = processing_class.eos_token
        return processing_class
    name = model_name(model)
    if not isinstance(model, str) and not Path(name).exists():
        raise ValueError("Pass `processing_class`: the tokenizer cannot be found from a model object without a path.")
    return load_tokenizer(name, trust_remote_code=trust_remote_code, revision=revision)


def load_model(
    model,
    auto_class: str = "AutoModelForCausalLM",
    *,
    dtype: str | None = "auto",
    device: str | None = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = None,
    model_init_kwargs: dict | None = None,
):
    """Load `model` (a name or path) with the given transformers auto class, in eval mode on `device`.

    An already-built model is only put in eval mode (and moved to `device` unless it is placed by a device map).
    """
    import torch
    import transformers

    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str):
        model.eval()
        if device not in (None, "auto") and getattr(model, "hf_device_map", None) is None:
            model.to(device)
        return model
    kwargs = dict(model_init_kwargs or {})
    if dtype is not None:
        kwargs.setdefault("dtype", dtype if dtype == "auto" else getattr(torch, dtype))
    kwargs.setdefault("trust_remote_code", trust_remote_code)
    if revision is not None:
        kwargs.setdefault("revision", revision)
    if attn_implementation is not None:
        kwargs.setdefault("attn_implementation", attn_implementation)
    loaded = getattr(transformers, auto_class).from_pretrained(model, **kwargs)
    if "device_map" not in kwargs:
        loaded.to(resolve_device(device))
    return loaded.eval()


def load_causal_lm(model, args):
    """The causal LM of `args` ([`ModelArguments`]: dtype, device, revision, ...) or an already-built one, in eval mode."""
    return load_model(
        model,
        "AutoModelForCausalLM",
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        revision=args.model_revision,
        attn_implementation=args.attn_implementation,
        model_init_kwargs=args.model_init_kwargs,
    )
