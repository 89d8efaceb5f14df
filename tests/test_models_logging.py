"""distattr's logging (distattr/logs.py) and what loading a model does to transformers' logging and progress bars,
which options reach the config and the tokenizer, and the import graph of distattr/models."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest
import transformers
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
from transformers.utils import logging as hf_logging

from distattr import logs
from distattr.models.loading import load

MODELS = Path(__file__).resolve().parents[1] / "distattr" / "models"
GROUP = "distattr-test.group"  # a hub progress-bar group, switched off on its own


def hf_state() -> dict:
    """What a load must leave as it found it: transformers' verbosity and progress bars, the hub's bars (global and
    one group's)."""
    return {"verbosity": hf_logging.get_verbosity(), "bars": hf_logging.is_progress_bar_enabled(),
            "hub_bars_off": are_progress_bars_disabled(), "group_off": are_progress_bars_disabled(GROUP)}


@pytest.fixture
def hf_settings():
    """``set(verbosity, bars)``: put transformers and the hub in a chosen state; the state before the test is put
    back afterwards."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()

    def set_state(level: int, enabled: bool) -> dict:
        if enabled and hub_constants.HF_HUB_DISABLE_PROGRESS_BARS is True:
            pytest.skip("HF_HUB_DISABLE_PROGRESS_BARS=1 keeps the progress bars off")
        if not enabled and hub_constants.HF_HUB_DISABLE_PROGRESS_BARS is False:
            pytest.skip("HF_HUB_DISABLE_PROGRESS_BARS=0 keeps the progress bars on")
        hf_logging.set_verbosity(level)
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
        if enabled:
            disable_progress_bars(GROUP)
        return hf_state()

    yield set_state
    hf_logging.set_verbosity(verbosity)
    (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()


@pytest.fixture
def spy(monkeypatch):
    """``spy(cls)``: record the keyword arguments (and transformers' state) of every ``cls.from_pretrained`` call,
    which still loads; returns the list of records."""

    def install(cls) -> list[dict]:
        calls: list[dict] = []
        real = cls.from_pretrained

        def from_pretrained(name, *args, **kwargs):
            calls.append({"name": str(name), "kwargs": kwargs, "state": hf_state()})
            return real(name, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", from_pretrained)
        return calls

    return install


@pytest.fixture
def config_only(tiny_dir, tmp_path) -> str:
    """A folder with a tiny model's config but no weights: loading it fails after transformers was quietened."""
    from transformers import AutoConfig

    AutoConfig.from_pretrained(tiny_dir("gpt2")).save_pretrained(tmp_path)
    return str(tmp_path)


# ------------------------------------------------------------------------------------------------ quiet loading


@pytest.mark.parametrize(("level", "bars"), [(logging.INFO, True), (logging.WARNING, False)])
def test_a_load_leaves_transformers_logging_and_progress_bars_as_they_were(tiny_dir, hf_settings, spy, level, bars):
    before = hf_settings(level, bars)
    during = spy(transformers.AutoConfig)
    load(tiny_dir("gpt2"))
    assert hf_state() == before
    assert during[0]["state"]["verbosity"] == logging.ERROR and during[0]["state"]["hub_bars_off"]


def test_a_failed_load_leaves_transformers_logging_and_progress_bars_as_they_were(config_only, hf_settings):
    before = hf_settings(logging.INFO, True)
    with pytest.raises(OSError, match="model.safetensors"):
        load(config_only)
    assert hf_state() == before


def test_a_failed_petals_load_leaves_transformers_logging_and_progress_bars_as_they_were(tiny_dir, hf_settings):
    before = hf_settings(logging.INFO, True)
    with pytest.raises(ValueError, match="Llama-architecture"):  # raised after the config was read, quietly
        load(f"petals://{tiny_dir('gpt2')}?initial_peers=/ip4/127.0.0.1/tcp/1/p2p/QmX&dht_prefix=tiny")
    assert hf_state() == before


def test_quiet_transformers_restores_also_when_the_block_raises(hf_settings):
    before = hf_settings(logging.DEBUG, True)
    with pytest.raises(KeyError), logs.quiet_transformers():
        assert hf_logging.get_verbosity() == logging.ERROR and are_progress_bars_disabled()
        raise KeyError("boom")
    assert hf_state() == before


# ------------------------------------------------------------------------------------------------ load options


def test_revision_and_hub_options_reach_the_config_and_the_tokenizer(tiny_dir, tmp_path, spy):
    configs, tokenizers = spy(transformers.AutoConfig), spy(transformers.AutoTokenizer)
    loaded = load(tiny_dir("gpt2"), revision="main",
                  model_kwargs={"trust_remote_code": False, "attn_implementation": "eager", "cache_dir": str(tmp_path)})
    assert configs[0]["kwargs"] == {"revision": "main", "trust_remote_code": False, "cache_dir": str(tmp_path)}
    assert tokenizers[0]["kwargs"] == {"revision": "main", "cache_dir": str(tmp_path)}
    assert loaded.revision == "main"
    assert loaded.model.config._attn_implementation == "eager"  # a model keyword: not given to the config


def test_tokenizer_kwargs_win_and_another_tokenizer_gets_no_model_revision(tiny_dir, spy):
    tokenizers = spy(transformers.AutoTokenizer)
    load(tiny_dir("gpt2"), revision="main", tokenizer_kwargs={"revision": "v2", "use_fast": True})
    load(tiny_dir("gpt2"), tokenizer=tiny_dir("llama"), revision="main")
    assert tokenizers[0]["kwargs"] == {"revision": "v2", "use_fast": True}
    assert tokenizers[1]["name"] == tiny_dir("llama") and tokenizers[1]["kwargs"] == {}


def test_a_revision_in_model_kwargs_is_the_revision(tiny_dir, spy):
    configs = spy(transformers.AutoConfig)
    assert load(tiny_dir("gpt2"), model_kwargs={"revision": "main"}).revision == "main"
    assert configs[0]["kwargs"] == {"revision": "main"}
    with pytest.raises(ValueError, match="differ"):
        load(tiny_dir("gpt2"), revision="main", model_kwargs={"revision": "v2"})


def test_petals_config_gets_the_config_options(tiny_dir, spy):
    configs = spy(transformers.AutoConfig)
    with pytest.raises(ValueError, match="Llama-architecture"):
        load(f"petals://{tiny_dir('gpt2')}?initial_peers=/ip4/127.0.0.1/tcp/1/p2p/QmX&dht_prefix=tiny",
             model_kwargs={"trust_remote_code": False, "attn_implementation": "eager"})
    assert configs[0]["kwargs"] == {"trust_remote_code": False}


# ------------------------------------------------------------------------------------------------ distattr logger


@pytest.fixture
def distattr_logger():
    """The ``distattr`` logger, with its level and handlers put back after the test."""
    level, handlers = logs.logger.level, list(logs.logger.handlers)
    yield logs.logger
    logs.logger.handlers[:] = handlers
    logs.logger.setLevel(level)


def test_configure_sends_distattr_records_to_stderr_and_leaves_the_root_logger_alone(distattr_logger, capsys):
    root = (logging.getLogger().level, list(logging.getLogger().handlers))
    handlers = list(distattr_logger.handlers)
    assert logs.configure("info") == logging.INFO
    logging.getLogger("distattr.jobs").debug("hidden at info")
    assert logs.configure("DEBUG") == logging.DEBUG  # again: replaces its handler
    logging.getLogger("distattr.models.loading").debug("loading %s", "tiny")
    err = capsys.readouterr().err
    assert "DEBUG distattr.models.loading: loading tiny" in err and "hidden" not in err
    new = [h for h in distattr_logger.handlers if h not in handlers]
    assert len(new) == 1 and len(distattr_logger.handlers) <= len(handlers) + 1  # one of its own, however often
    assert (logging.getLogger().level, list(logging.getLogger().handlers)) == root


def test_configure_takes_level_names_and_numbers_and_refuses_others(distattr_logger):
    assert [logs.configure(name) for name in logs.LOG_LEVELS] == [10, 20, 30, 40, 50]
    assert logs.configure(15) == 15 and logs.configure("Warning") == logging.WARNING
    for bad in ("loud", "", True, -1, None):
        with pytest.raises(ValueError, match=r"^Unknown log level .*debug, info, warning, error, critical") as err:
            logs.configure(bad)
        assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ import graph


def model_imports() -> dict[str, set[str]]:
    """``{module: modules of distattr/models it imports}``, top-level and function-level imports alike, relative
    (``from .x``, ``from ..models import x``) or absolute (``distattr.models.x``)."""
    names = {p.stem for p in MODELS.glob("*.py")}
    graph = {}
    for path in MODELS.glob("*.py"):
        targets = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                package = ["distattr", "models"]  # where the files are: level 1 is this package, 2 its parent
                base = package[:len(package) - node.level + 1] if node.level else []
                module = ".".join([*base, *([node.module] if node.module else [])])
                targets += [module] + [f"{module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets += [a.name for a in node.names]
        parts = [t.split(".") for t in targets]
        graph[path.stem] = {p[2] for p in parts if p[:2] == ["distattr", "models"] and len(p) > 2} & names
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle through each module (as a path back to it)."""
    found = []
    for start in graph:
        pending = [[start]]
        while pending:
            path = pending.pop()
            for nxt in graph[path[-1]]:
                if nxt == start:
                    found.append([*path, start])
                elif nxt not in path:
                    pending.append([*path, nxt])
    return found


def test_models_have_no_import_circles():
    assert cycles(model_imports()) == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"], ["b", "c", "a", "b"],
                                                                       ["c", "a", "b", "c"]]
