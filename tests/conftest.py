import sys
import warnings
from pathlib import Path

import pytest

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
