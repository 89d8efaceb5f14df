"""Credentials and other people's data (issue 13): storage options never reach the store, the logs or the
provenance (which keeps the command line, redacted); ``env:NAME`` option values; a store cannot make ``distattr
stats`` load a model with code-running options; ``save_outputs(overwrite=True)`` replaces only distattr stores."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from distattr.cli import UsageError, main
from distattr.cli.common import fsspec_options
from distattr.redaction import redact_command, secret_name
from distattr.store import StoreError, open_store, save_outputs

# ---------------------------------------------------------------- the redacted command line


@pytest.mark.parametrize("name", ["key", "secret", "token", "password", "passwd", "credential", "credentials",
                                  "access_key", "secret_key", "session_token", "account_key", "sas_token",
                                  "client_secret", "private_key", "aws_secret_access_key", "HF_TOKEN", "apikey",
                                  "--hf-token", "--api-key", "sig"])
def test_secret_looking_names(name):
    assert secret_name(name)


@pytest.mark.parametrize("name", ["endpoint_url", "anon", "max_new_tokens", "tokenizer_kwargs", "--token-budget",
                                  "client_kwargs", "--keep-field", "region_name"])
def test_names_that_are_not_secrets(name):
    assert not secret_name(name)


def test_the_command_keeps_everything_but_credentials():
    argv = ["distattr", "attribute-dataset", "--model", "gpt2", "--storage-option", "key=AKIAEXAMPLE",
            "--storage-option", "secret=s3cr3t-one", "--storage-option=token=s3cr3t-two", "--data-option",
            "endpoint_url=http://user:s3cr3t-three@127.0.0.1:9000", "--data", "https://h/d.jsonl?sv=1&sig=s3cr3t-four",
            "--hf-token", "s3cr3t-five", "--password=s3cr3t-six", "--storage-option",
            'client_kwargs={"aws_secret_access_key": "s3cr3t-seven"}', "--model-kwarg", "api_key=s3cr3t-eight",
            "--storage-option", "secret=env:MY_SECRET", "--token-budget", "512", "--generation-arg",
            "max_new_tokens=4", "--storage-option", "endpoint_url=http://127.0.0.1:9000", "--store", "s3://b/r.zarr"]
    line = redact_command(argv)
    assert "s3cr3t" not in line and "AKIAEXAMPLE" not in line
    assert line == ("distattr attribute-dataset --model gpt2 --storage-option key=*** --storage-option secret=*** "
                    "--storage-option=token=*** --data-option endpoint_url=http://user:***@127.0.0.1:9000 "
                    "--data 'https://h/d.jsonl?sv=1&sig=***' --hf-token *** --password=*** "
                    "--storage-option client_kwargs=*** --model-kwarg api_key=*** "
                    "--storage-option secret=env:MY_SECRET --token-budget 512 --generation-arg max_new_tokens=4 "
                    "--storage-option endpoint_url=http://127.0.0.1:9000 --store s3://b/r.zarr")


# ---------------------------------------------------------------- env:NAME values


def test_an_env_value_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("DISTATTR_TEST_SECRET", "123456")
    options = fsspec_options(["secret=env:DISTATTR_TEST_SECRET", "anon=false"], "--storage-option")
    assert options == {"secret": "123456", "anon": False}  # the variable's text as it is, not parsed as JSON


def test_a_missing_env_variable_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("DISTATTR_NOT_SET", raising=False)
    with pytest.raises(UsageError, match="^--data-option token=env:DISTATTR_NOT_SET: the environment variable "
                                         "DISTATTR_NOT_SET is not set$"):
        fsspec_options(["token=env:DISTATTR_NOT_SET"], "--data-option")
    code = main(["attribute-dataset", "--data", str(tmp_path / "d.jsonl"), "--store", str(tmp_path / "s.zarr"),
                 "--max-new-tokens", "2", "--storage-option", "secret=env:DISTATTR_NOT_SET"])
    assert code == 2
    assert capsys.readouterr().err == ("distattr: error: --storage-option secret=env:DISTATTR_NOT_SET: the environment "
                                       "variable DISTATTR_NOT_SET is not set\n")


def test_stats_reads_env_storage_options_too(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("DISTATTR_NOT_SET", raising=False)
    code = main(["stats", str(tmp_path / "s.zarr"), "--storage-option", "key=env:DISTATTR_NOT_SET"])
    assert code == 2 and capsys.readouterr().err == ("distattr: error: --storage-option key=env:DISTATTR_NOT_SET: the "
                                                      "environment variable DISTATTR_NOT_SET is not set\n")
    seen = {}
    monkeypatch.setenv("DISTATTR_TEST_SECRET", "s3cr3t-value")
    monkeypatch.setattr("distattr.store.open_store", lambda path, options=None: seen.update(options) or 1 / 0)
    main(["stats", "s3://bucket/s.zarr", "--storage-option", "secret=env:DISTATTR_TEST_SECRET"])
    assert seen == {"secret": "s3cr3t-value"}
    assert "s3cr3t-value" not in capsys.readouterr().err


@pytest.mark.parametrize("error, status, prefix", [(OSError, 1, "error: "), (ValueError, 2, "error: "),
                                                   (LookupError, 1, "internal error: LookupError: ")])
def test_an_error_that_quotes_an_option_does_not_print_the_secret(monkeypatch, tmp_path, capsys, error, status,
                                                                  prefix):
    import distattr.jobs

    def fail(*args, storage_options=None, **kwargs):
        raise error(f"cannot connect with options {storage_options}")

    monkeypatch.setattr(distattr.jobs, "attribute_dataset", fail)
    monkeypatch.setenv("DISTATTR_TEST_TOKEN", "tok-from-env-9876")
    code = main(["attribute-dataset", "--data", str(tmp_path / "d.jsonl"), "--store", "s3://b/s.zarr",
                 "--max-new-tokens", "2", "--storage-option", "secret=very-secret-value",
                 "--storage-option", "session=env:DISTATTR_TEST_TOKEN", "--storage-option", "anon=false"])
    err = capsys.readouterr().err
    assert code == status and "very-secret-value" not in err and "tok-from-env-9876" not in err
    assert err.startswith(f"distattr: {prefix}cannot connect with options {{'secret': '***', 'session': '***', "
                          "'anon': False}")


# ---------------------------------------------------------------- a job on S3: the secret is nowhere


def _store_bytes(options: dict, bucket: str = "distattr-test") -> dict[str, bytes]:
    import s3fs

    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    return {path: fs.cat_file(path) for path in fs.find(bucket)}


@pytest.mark.slow
def test_a_job_on_s3_writes_and_prints_no_secret(ray_head, tiny_dir, s3_server, tmp_path):
    from raycluster import ray_env
    from test_dist import prompts, write_jsonl

    secret = f"distattr-secret-{secrets.token_hex(16)}"
    data = write_jsonl(tmp_path / "d.jsonl", prompts(4))
    common = ["--model", tiny_dir("gpt2"), "--data", str(data), "--id-field", "uid", "--max-new-tokens", "2",
              "--unit-size", "2", "--address", ray_head.address,
              "--storage-option", f"endpoint_url={s3_server['endpoint_url']}", "--storage-option", "key=AKIATESTKEY"]
    cmd = [sys.executable, "-m", "distattr", "attribute-dataset", *common]
    done = subprocess.run([*cmd, "--store", "s3://distattr-test/plain.zarr", "--storage-option", f"secret={secret}"],
                          env=ray_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert secret not in done.stdout and secret not in done.stderr
    objects = _store_bytes(s3_server)
    assert any(path.endswith("plain.zarr/zarr.json") for path in objects)
    assert not [path for path, data in objects.items() if secret.encode() in data]
    command = open_store("s3://distattr-test/plain.zarr", s3_server).provenance["command"]
    assert "--storage-option key=***" in command and "--storage-option secret=***" in command
    assert "AKIATESTKEY" not in command and f"--storage-option endpoint_url={s3_server['endpoint_url']}" in command

    env = {**ray_env(), "DISTATTR_TEST_S3_SECRET": secret}
    done = subprocess.run([*cmd, "--store", "s3://distattr-test/env.zarr", "--storage-option",
                           "secret=env:DISTATTR_TEST_S3_SECRET"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert secret not in done.stdout and secret not in done.stderr
    store = open_store("s3://distattr-test/env.zarr", s3_server)
    assert store.complete and "--storage-option secret=env:DISTATTR_TEST_S3_SECRET" in store.provenance["command"]
    assert not [path for path, data in _store_bytes(s3_server).items() if secret.encode() in data]

    missing = subprocess.run([*cmd, "--store", "s3://distattr-test/none.zarr", "--storage-option",
                              "secret=env:DISTATTR_TEST_UNSET"], env=ray_env(), capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == ["distattr: error: --storage-option secret=env:DISTATTR_TEST_UNSET: "
                                                   "the environment variable DISTATTR_TEST_UNSET is not set"]


# ---------------------------------------------------------------- save_outputs(overwrite=True)


@pytest.fixture(scope="module")
def output():
    from tiny import tiny_model

    import distattr

    model, tok = tiny_model("gpt2")
    attribution_model = distattr.load_model(model, "saliency", tokenizer=tok)
    return attribution_model.attribute(["a b c"], generation_args={"max_new_tokens": 2}, show_progress=False)


def _snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _folder_with_a_file(path: Path) -> None:
    path.mkdir()
    (path / "thesis.tex").write_text("years of work")


def _plain_file(path: Path) -> None:
    path.write_text("years of work")


def _zarr_group(path: Path) -> None:
    import zarr

    zarr.open_group(str(path), mode="w", zarr_format=3).attrs.update({"project": "someone else's"})


@pytest.mark.parametrize("make", [_folder_with_a_file, _plain_file, _zarr_group])
def test_overwrite_refuses_what_is_not_a_distattr_store(output, tmp_path, make):
    path = tmp_path / "target"
    make(path)
    before = _snapshot(path)
    with pytest.raises(StoreError, match=r"^overwrite=True replaces only a distattr store; left .*target as it is: "
                                         r".*target (exists but is|is a Zarr group but) not a distattr store"):
        save_outputs(str(path), output, overwrite=True)
    assert _snapshot(path) == before


def test_overwrite_replaces_a_distattr_store(output, tmp_path):
    path = str(tmp_path / "mine.zarr")
    save_outputs(path, output, ids=["old"])
    save_outputs(path, output, ids=["new"], overwrite=True)
    store = open_store(path)
    assert store.complete and store[0].info["example_id"] == "new"


# ---------------------------------------------------------------- a store cannot choose how a model is loaded


@pytest.fixture
def crafted_store(output, tiny_dir, tmp_path) -> str:
    """A store whose identity names the tiny model with load arguments that would run code."""
    url = str(tmp_path / "crafted.zarr")
    identity = {"model": tiny_dir("gpt2"), "method": "saliency", "method_args": {},
                "load_args": {"trust_remote_code": True, "revision": "evil-code-revision", "dtype": "float16",
                              "quantization": {"quant_method": "evil", "llm_int8_skip_modules": ["__import__('os')"]},
                              "model_kwargs": {"trust_remote_code": True, "code_revision": "evil"},
                              "tokenizer_kwargs": {"trust_remote_code": True}}}
    save_outputs(url, output, identity=identity)
    assert open_store(url).identity["load_args"]["trust_remote_code"] is True
    return url


def _record_loads(monkeypatch) -> list[tuple[str, dict]]:
    import distattr.api

    calls: list[tuple[str, dict]] = []

    def load_model(model, *args, **kwargs):
        calls.append((model, kwargs))
        raise ValueError("recorded: no model loaded")  # distattr stats stops with exit status 2

    monkeypatch.setattr(distattr.api, "load_model", load_model)
    return calls


def test_faithfulness_takes_only_the_model_name_from_a_store(crafted_store, tiny_dir, monkeypatch, capsys):
    calls = _record_loads(monkeypatch)
    assert main(["stats", crafted_store, "--faithfulness", "--limit", "1"]) == 2
    assert calls == [(tiny_dir("gpt2"), {})]
    assert (f"Loading {tiny_dir('gpt2')} (the store's model, by name only: its stored load options are not used) "
            "...") in capsys.readouterr().err


def test_faithfulness_loads_with_the_users_options(crafted_store, tiny_dir, monkeypatch):
    calls = _record_loads(monkeypatch)
    assert main(["stats", crafted_store, "--faithfulness", "--model", tiny_dir("gpt2"), "--dtype", "bfloat16",
                 "--device", "cpu", "-q"]) == 2
    assert calls == [(tiny_dir("gpt2"), {"dtype": "bfloat16", "device": "cpu"})]


def test_faithfulness_with_the_crafted_store_runs_on_a_safely_loaded_model(crafted_store, tiny_dir, monkeypatch,
                                                                         tmp_path):
    import transformers

    seen: list[dict] = []
    real = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        seen.append(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(from_pretrained))
    with pytest.warns(UserWarning, match="config hash"):  # loaded from a folder: another _name_or_path
        code = main(["stats", crafted_store, "--faithfulness", "--limit", "1", "--fractions", "0.5",
                     "--no-random-baseline", "--tables", str(tmp_path / "t"), "-q"])
    assert code == 0 and (tmp_path / "t" / "faithfulness-abs-steps.csv").is_file()
    assert seen, "the model was not loaded through AutoModelForCausalLM.from_pretrained"
    text = json.dumps(seen, default=str)
    assert "trust_remote_code" not in text and "evil" not in text and "float16" not in text


def test_a_petals_spec_from_a_store_is_not_loaded(output, tmp_path, monkeypatch):
    calls = _record_loads(monkeypatch)
    url = str(tmp_path / "petals.zarr")
    save_outputs(url, output, identity={"model": "petals://m?initial_peers=/ip4/1.2.3.4/tcp/1&python=/tmp/evil.sh",
                                        "method": "saliency"})
    assert main(["stats", url, "--faithfulness", "-q"]) == 2
    assert calls == []
