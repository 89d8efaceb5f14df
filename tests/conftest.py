import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
warnings.filterwarnings("ignore", category=UserWarning, module="captum")


@pytest.fixture
def tiny():
    """``tiny(kind, method="saliency", **args)`` -> a distattr AttributionModel on a tiny random model."""
    from tiny import tiny_model

    import distattr

    def make(kind: str = "gpt2", method: str = "saliency", **args):
        model, tok = tiny_model(kind)
        return distattr.load_model(model, method, tokenizer=tok, **args)

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are overhead-bound: one intra-op thread is several times faster than two on a busy machine.
    Modules that run many tiny models use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
