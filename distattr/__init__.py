"""distattr: fast, distributed feature attribution for generative language models."""

__version__ = "0.3.0"  # the one place: pyproject.toml reads it

from .aggregate import Normalize, Reduce, Rescale, Slice, Spans, Words, pair_difference  # noqa: E402
from .api import AttributionModel, load_model  # noqa: E402
from .jobs import attribute_dataset  # noqa: E402
from .methods import list_methods, register_method  # noqa: E402
from .results import AttributionOutput, SequenceAttribution, load  # noqa: E402
from .steps import StepContext, list_step_functions, register_step_function  # noqa: E402
from .store import open_store  # noqa: E402

__all__ = [
    "AttributionModel", "AttributionOutput", "Normalize", "Reduce", "Rescale", "SequenceAttribution", "Slice", "Spans",
    "StepContext", "Words", "attribute_dataset", "list_methods", "list_step_functions", "load", "load_model",
    "open_store", "pair_difference", "register_method", "register_step_function",
]
