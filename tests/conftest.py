import os

import pytest

pytest_plugins = ["hf_instruct_tune.testing.pytest_plugin"]


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path, monkeypatch):
    """No test reads the user's Hub cache or token, or reaches the network (the `hub_server` fixture opts back in, locally)."""
    from huggingface_hub import constants

    hf_home = str(tmp_path / "hf_home")
    monkeypatch.setenv("HF_HOME", hf_home)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_INSTRUCT_TUNE_GGUF_CACHE", "0")  # no 0.5 GB cache entry per test; tests/test_gguf_cache.py opts in
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    # huggingface_hub reads these at import time: patch the module too, so the running process follows.
    monkeypatch.setattr(constants, "HF_HOME", hf_home)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", os.path.join(hf_home, "hub"))
    monkeypatch.setattr(constants, "HF_ASSETS_CACHE", os.path.join(hf_home, "assets"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", os.path.join(hf_home, "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", os.path.join(hf_home, "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(autouse=True)
def _restored_logging_and_warnings():
    """A CLI run in-process (as rank 1, or with --verbose) changes logger levels and warning filters; undo it."""
    import logging
    import warnings

    names = ("hf_instruct_tune", "httpx", "httpcore", "httpx2", "urllib3")
    levels = {name: logging.getLogger(name).level for name in names}
    with warnings.catch_warnings():
        yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
