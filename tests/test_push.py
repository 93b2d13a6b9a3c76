"""Publishing through the local Hub server: push_adapter, the 'upload' command, auth failures, token hygiene."""

from __future__ import annotations

import logging

import pytest
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError

from hf_instruct_tune.cli import main
from hf_instruct_tune.errors import PublishError
from hf_instruct_tune.hub.push import check_write_access, push_adapter, resolve_endpoint, resolve_token

from test_card import make_adapter_dir


@pytest.fixture
def adapter(tmp_path):
    return make_adapter_dir(tmp_path / "out")


def upload(hub, *args):
    return main(["upload", *args, "--endpoint", hub.url, "--token", hub.token])


def test_upload_command_pushes_adapter_and_card(hub_server, adapter, capsys):
    assert upload(hub_server, "alice/demo", str(adapter)) == 0
    assert capsys.readouterr().out.strip().startswith(f"{hub_server.url}/alice/demo/commit/")
    api = HfApi(endpoint=hub_server.url, token=hub_server.token)
    files = set(api.list_repo_files("alice/demo"))
    assert {"adapter_model.safetensors", "adapter_config.json", "prompt_template.jinja", "hf_instruct_tune.json",
            "tokenizer_config.json", "README.md", "loss_curve.png"} <= files
    card = ModelCard.load(hf_hub_download("alice/demo", "README.md"))
    assert card.data.library_name == "peft" and card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "PeftModel.from_pretrained(base, 'alice/demo')" in card.text
    assert not (adapter / "README.md").exists()  # the card is generated for the upload, the folder is untouched


def test_pushing_twice(hub_server, adapter):
    first = push_adapter(adapter, "alice/demo", token=hub_server.token, endpoint=hub_server.url)
    commits = HfApi(endpoint=hub_server.url).list_repo_commits("alice/demo")
    assert push_adapter(adapter, "alice/demo", token=hub_server.token, endpoint=hub_server.url) is None  # unchanged
    assert HfApi(endpoint=hub_server.url).list_repo_commits("alice/demo") == commits  # no empty commit
    (adapter / "adapter_model.safetensors").write_bytes(b"\1" * 2048)
    second = push_adapter(adapter, "alice/demo", token=hub_server.token, endpoint=hub_server.url, commit_message="v2")
    assert second.oid != first.oid
    files = HfApi(endpoint=hub_server.url).list_repo_files("alice/demo")
    assert len(files) == len(set(files))
    assert open(hf_hub_download("alice/demo", "adapter_model.safetensors"), "rb").read() == b"\1" * 2048


def test_private(hub_server, adapter):
    assert upload(hub_server, "alice/hidden", str(adapter), "--private") == 0
    assert HfApi(endpoint=hub_server.url, token=hub_server.token).model_info("alice/hidden").private
    with pytest.raises(HfHubHTTPError):
        HfApi(endpoint=hub_server.url, token=False).model_info("alice/hidden")


def test_revision_creates_branch(hub_server, adapter):
    assert upload(hub_server, "alice/demo", str(adapter), "--revision", "exp-1") == 0
    api = HfApi(endpoint=hub_server.url)
    assert "adapter_model.safetensors" in api.list_repo_files("alice/demo", revision="exp-1")
    assert api.list_repo_files("alice/demo") == [".gitattributes"]


def test_create_pr(hub_server, adapter, capsys):
    push_adapter(adapter, "alice/demo", token=hub_server.token, endpoint=hub_server.url)
    (adapter / "adapter_model.safetensors").write_bytes(b"\2" * 2048)
    assert upload(hub_server, "alice/demo", str(adapter), "--create-pr", "--commit-message", "Proposal") == 0
    assert capsys.readouterr().out.strip() == f"{hub_server.url}/alice/demo/discussions/1"
    path = hf_hub_download("alice/demo", "adapter_model.safetensors", revision="refs/pr/1")
    assert open(path, "rb").read() == b"\2" * 2048


def test_path_in_repo_include_exclude_and_no_card(hub_server, adapter):
    assert upload(hub_server, "alice/demo", str(adapter), "sub", "--exclude", "*.jinja", "--no-card") == 0
    files = HfApi(endpoint=hub_server.url).list_repo_files("alice/demo")
    assert "sub/adapter_model.safetensors" in files and "sub/prompt_template.jinja" not in files
    assert "sub/README.md" not in files
    assert upload(hub_server, "alice/demo", str(adapter / "adapter_config.json"), "--include", "*.json") == 0
    assert "adapter_config.json" in HfApi(endpoint=hub_server.url).list_repo_files("alice/demo")


@pytest.mark.parametrize(
    ("token_kind", "expected"),
    [("missing", "Not logged in"), ("bad", "rejected"), ("other", "cannot write to namespace 'alice'")],
)
def test_auth_failures_are_fast_and_clear(hub_server, adapter, capsys, token_kind, expected):
    token = {"missing": [], "bad": ["--token", "hf_bad_token_0000000000"], "other": ["--token", hub_server.other_token]}[token_kind]
    assert main(["upload", "alice/demo", str(adapter), "--endpoint", hub_server.url, *token]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and len(err.strip().splitlines()) == 1
    assert "hf auth login" in err or "Use a repo id like 'bob/demo'" in err
    assert "hf_bad_token" not in err and hub_server.other_token not in err
    assert not HfApi(endpoint=hub_server.url).repo_exists("alice/demo")


def test_check_write_access(hub_server):
    assert check_write_access("alice/x", hub_server.token, hub_server.url) == "alice/x"
    assert check_write_access("x", hub_server.token, hub_server.url) == "alice/x"
    with pytest.raises(PublishError, match="127.0.0.1"):
        check_write_access("alice/x", hub_server.token, "http://127.0.0.1:9")


def test_token_and_endpoint_resolution(monkeypatch, hub_server):
    monkeypatch.setenv("HF_TOKEN", "hf_from_env_000000000")
    assert resolve_token("hf_explicit_0000000") == "hf_explicit_0000000"
    assert resolve_token() == "hf_from_env_000000000"
    monkeypatch.delenv("HF_TOKEN")
    from pathlib import Path

    from huggingface_hub import constants

    saved = Path(constants.HF_TOKEN_PATH)  # inside the test's HF_HOME
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text("hf_saved_login_00000")
    assert resolve_token() == "hf_saved_login_00000"
    monkeypatch.setenv("HF_ENDPOINT", "http://example.invalid/")
    assert resolve_endpoint() == "http://example.invalid"
    assert resolve_endpoint("http://other/") == "http://other"


def test_token_is_never_written_or_printed(hub_server, adapter, tmp_path, capsys, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    assert main(["upload", "alice/demo", str(adapter), "--endpoint", hub_server.url]) == 0
    assert upload(hub_server, "alice/demo2", str(adapter), "--create-pr") == 0
    assert main(["card", str(adapter)]) == 0
    captured = capsys.readouterr()
    needle = hub_server.token.encode()
    assert needle not in (captured.out + captured.err + caplog.text).encode()
    for root in (tmp_path, hub_server.root):
        for path in root.rglob("*"):
            if path.is_file():
                assert needle not in path.read_bytes(), path


@pytest.mark.parametrize("recorded", ["HuggingFaceTB/SmolLM2-135M-Instruct", None])
def test_uploaded_adapter_config_names_no_local_path(hub_server, adapter, recorded):
    import json

    from hf_instruct_tune.metadata import TrainingMetadata

    config_path = adapter / "adapter_config.json"
    local_base = str(adapter.parent)  # an existing local folder, as when the base was loaded from disk
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "base_model_name_or_path": local_base}))
    metadata = TrainingMetadata.load(adapter)
    metadata.base_model = recorded
    metadata.save(adapter)
    assert upload(hub_server, "alice/portable", str(adapter)) == 0
    uploaded = json.loads(open(hf_hub_download("alice/portable", "adapter_config.json")).read())
    assert uploaded["base_model_name_or_path"] == recorded
    assert json.loads(config_path.read_text())["base_model_name_or_path"] == local_base  # the folder is untouched


def test_uploading_an_unchanged_folder_says_so_once_and_reports_no_commit(hub_server, adapter, capsys, caplog):
    assert upload(hub_server, "alice/demo", str(adapter)) == 0
    capsys.readouterr()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert upload(hub_server, "alice/demo", str(adapter)) == 0
    captured = capsys.readouterr()
    assert captured.out == ""  # no commit URL: there is no new commit
    messages = [record.getMessage() for record in caplog.records]
    assert sum("Nothing to push: alice/demo (main) already holds these" in m for m in messages) == 1, messages
    assert not any("No files have been modified" in m or "/commit/" in m for m in messages), messages
    assert "No files have been modified" not in captured.err


def test_a_local_endpoint_works_in_offline_mode(hub_server, adapter, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)  # the local server speaks LFS only
    assert upload(hub_server, "alice/offline", str(adapter)) == 0
    assert constants.HF_HUB_OFFLINE is True and constants.HF_HUB_DISABLE_XET is False  # restored afterwards
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert "adapter_model.safetensors" in HfApi(endpoint=hub_server.url).list_repo_files("alice/offline")
