import pytest

pytest_plugins = ["hf_instruct_tune.testing.pytest_plugin"]


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path, monkeypatch):
    """No test reads the user's Hub cache or token, or reaches the network (the `hub_server` fixture opts back in, locally)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
