"""Model configs shipped for planning (``distattr plan --model llama-3-70b``): the public ``config.json`` of
each model (no weights), so :mod:`distattr.planner` can build it on the ``meta`` device without the hub.
Where each file comes from: ``SOURCES.md`` in this folder."""

from __future__ import annotations

from pathlib import Path

# name -> (file in this folder, the Hugging Face repository whose config.json it is)
SHIPPED_CONFIGS: dict[str, tuple[str, str]] = {
    "llama-3-70b": ("llama-3-70b.json", "meta-llama/Meta-Llama-3-70B"),
    "llama-3.1-8b": ("llama-3.1-8b.json", "meta-llama/Llama-3.1-8B"),  # 128k context (Llama-3-8B's is 8k)
    "llama-2-70b": ("llama-2-70b.json", "meta-llama/Llama-2-70b-hf"),
    "mixtral-8x7b": ("mixtral-8x7b.json", "mistralai/Mixtral-8x7B-v0.1"),
    "qwen2-72b": ("qwen2-72b.json", "Qwen/Qwen2-72B"),
    "smollm2-135m": ("smollm2-135m.json", "HuggingFaceTB/SmolLM2-135M-Instruct"),  # the embedded model
}


def config_path(name: str) -> Path:
    """The shipped ``config.json`` of ``name`` (a key of :data:`SHIPPED_CONFIGS`)."""
    return Path(__file__).with_name(SHIPPED_CONFIGS[name][0])
