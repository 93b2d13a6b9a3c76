"""The local Hub server, driven by the real huggingface_hub client (localhost only)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError

from hf_instruct_tune.testing.hub_server import HubServer, main as server_main


@pytest.fixture
def api(hub_server):
    return HfApi(endpoint=hub_server.url, token=hub_server.token)


@pytest.fixture
def folder(tmp_path):
    folder = tmp_path / "upload"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("hello hub\n")
    (folder / "sub" / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    (folder / "big.dat").write_bytes(os.urandom(11 * 1024 * 1024))  # over 10 MiB: LFS whatever its name
    return folder


def test_whoami(api, hub_server):
    assert api.whoami()["name"] == "alice"
    with pytest.raises(HfHubHTTPError) as info:
        HfApi(endpoint=hub_server.url, token="hf_not_a_token").whoami()
    assert info.value.response.status_code == 401
    import httpx2

    assert httpx2.get(f"{hub_server.url}/api/whoami-v2").status_code == 401  # no token at all


def test_create_repo_twice_with_exist_ok(api):
    url = api.create_repo("alice/model")
    assert url.repo_id == "alice/model"
    assert api.create_repo("alice/model", exist_ok=True).repo_id == "alice/model"
    with pytest.raises(HfHubHTTPError) as info:
        api.create_repo("alice/model")
    assert info.value.response.status_code == 409
    assert api.list_repo_files("alice/model") == [".gitattributes"]


def test_upload_folder_list_and_download(api, hub_server, folder):
    api.create_repo("alice/model")
    info = api.upload_folder(repo_id="alice/model", folder_path=folder, commit_message="first")
    assert len(info.oid) == 40

    assert sorted(api.list_repo_files("alice/model")) == [".gitattributes", "big.dat", "notes.txt", "sub/adapter_model.safetensors"]
    tree = {f.path: f for f in api.list_repo_tree("alice/model", recursive=True)}
    assert tree["notes.txt"].lfs is None
    assert tree["sub/adapter_model.safetensors"].lfs is not None
    assert tree["big.dat"].lfs.size == 11 * 1024 * 1024
    assert [f.path for f in api.list_repo_tree("alice/model")] == ["sub", ".gitattributes", "big.dat", "notes.txt"]

    for name in ("notes.txt", "sub/adapter_model.safetensors", "big.dat"):
        path = hf_hub_download("alice/model", name, endpoint=hub_server.url, token=hub_server.token)
        assert open(path, "rb").read() == (folder / name).read_bytes()
    snapshot = snapshot_download("alice/model", endpoint=hub_server.url, token=hub_server.token)
    assert (folder / "notes.txt").read_text() == open(os.path.join(snapshot, "notes.txt")).read()
    assert api.model_info("alice/model").sha == info.oid
    assert api.model_info("alice/model", revision=info.oid).sha == info.oid


def test_second_upload_updates_without_duplicates(api, folder):
    api.create_repo("alice/model")
    first = api.upload_folder(repo_id="alice/model", folder_path=folder)
    same = api.upload_folder(repo_id="alice/model", folder_path=folder)
    assert same.oid == first.oid  # nothing changed: the client skips the empty commit

    (folder / "notes.txt").write_text("second version\n")
    second = api.upload_folder(repo_id="alice/model", folder_path=folder, commit_message="update notes")
    assert second.oid != first.oid
    files = api.list_repo_files("alice/model")
    assert len(files) == len(set(files)) == 4
    assert [c.title for c in api.list_repo_commits("alice/model")] == ["update notes", "Upload folder using huggingface_hub", "initial commit"]
    path = hf_hub_download("alice/model", "notes.txt", revision=first.oid)
    assert open(path).read() == "hello hub\n"
    assert open(hf_hub_download("alice/model", "notes.txt")).read() == "second version\n"


def test_create_commit_add_and_delete(api):
    api.create_repo("alice/model")
    api.create_commit("alice/model", [CommitOperationAdd("a.txt", b"a"), CommitOperationAdd("b/c.txt", b"c")], commit_message="add")
    api.create_commit("alice/model", [CommitOperationDelete("a.txt"), CommitOperationDelete("b/")], commit_message="delete")
    assert api.list_repo_files("alice/model") == [".gitattributes"]


def test_private_repo_is_hidden_from_anonymous_and_other_users(api, hub_server):
    api.create_repo("alice/secret", private=True)
    api.upload_file(path_or_fileobj=b"s3cret", path_in_repo="x.txt", repo_id="alice/secret")
    assert api.model_info("alice/secret").private is True
    for token in (False, hub_server.other_token):
        other = HfApi(endpoint=hub_server.url, token=token)
        with pytest.raises(HfHubHTTPError) as info:
            other.model_info("alice/secret")
        assert info.value.response.status_code == 404
        with pytest.raises(HfHubHTTPError):
            hf_hub_download("alice/secret", "x.txt", endpoint=hub_server.url, token=token)


def test_unauthenticated_write_is_401_and_other_namespace_403(api, hub_server):
    api.create_repo("alice/model")
    anonymous = HfApi(endpoint=hub_server.url, token=False)
    with pytest.raises(HfHubHTTPError) as info:
        anonymous.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/model")
    assert info.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as info:
        anonymous.create_repo("alice/other")
    assert info.value.response.status_code == 401

    bob = HfApi(endpoint=hub_server.url, token=hub_server.other_token)
    with pytest.raises(HfHubHTTPError) as info:
        bob.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/model")
    assert info.value.response.status_code == 403
    assert "alice" in info.value.response.headers["X-Error-Message"]
    with pytest.raises(HfHubHTTPError) as info:
        bob.create_repo("alice/bobs-repo")
    assert info.value.response.status_code == 403
    assert bob.create_repo("bob/own").repo_id == "bob/own"


def test_revision_branch(api):
    api.create_repo("alice/model")
    api.create_branch("alice/model", branch="dev")
    api.create_branch("alice/model", branch="dev", exist_ok=True)
    api.upload_file(path_or_fileobj=b"dev", path_in_repo="dev.txt", repo_id="alice/model", revision="dev")
    assert "dev.txt" in api.list_repo_files("alice/model", revision="dev")
    assert "dev.txt" not in api.list_repo_files("alice/model")
    assert {b.name for b in api.list_repo_refs("alice/model").branches} == {"main", "dev"}
    with pytest.raises(HfHubHTTPError) as info:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/model", revision="missing")
    assert info.value.response.status_code == 404


def test_create_pr(api):
    api.create_repo("alice/model")
    info = api.upload_file(path_or_fileobj=b"proposal", path_in_repo="pr.txt", repo_id="alice/model", create_pr=True)
    assert info.pr_revision == "refs/pr/1" and info.pr_num == 1
    assert "pr.txt" in api.list_repo_files("alice/model", revision="refs/pr/1")
    assert "pr.txt" not in api.list_repo_files("alice/model")
    path = hf_hub_download("alice/model", "pr.txt", revision="refs/pr/1")
    assert open(path).read() == "proposal"
    assert api.upload_file(path_or_fileobj=b"again", path_in_repo="pr.txt", repo_id="alice/model", create_pr=True).pr_num == 2


def test_errors_are_json_with_header(hub_server):
    import httpx2

    response = httpx2.get(f"{hub_server.url}/api/models/alice/nope")
    assert response.status_code == 404
    assert response.json() == {"error": "Repository not found: alice/nope"}
    assert response.headers["X-Error-Code"] == "RepoNotFound"
    assert response.headers["X-Error-Message"] == "Repository not found: alice/nope"


def test_hf_endpoint_env_in_fresh_subprocess(api, hub_server, folder):
    api.create_repo("alice/model")
    api.upload_folder(repo_id="alice/model", folder_path=folder)
    code = textwrap.dedent(
        """
        from huggingface_hub import hf_hub_download
        print(open(hf_hub_download("alice/model", "notes.txt"), encoding="utf-8").read(), end="")
        """
    )
    env = hub_server.env(HF_HOME=str(folder.parent / "sub_hf_home"))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello hub\n"


def test_storage_survives_restart(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with HubServer(tmp_path, {"t": "carol"}, user="carol") as server:
        HfApi(endpoint=server.url, token="t").create_repo("carol/keep")
        HfApi(endpoint=server.url, token="t").upload_file(path_or_fileobj=b"k", path_in_repo="k.txt", repo_id="carol/keep")
    with HubServer(tmp_path, {"t": "carol"}, user="carol") as server:
        assert "k.txt" in HfApi(endpoint=server.url, token="t").list_repo_files("carol/keep")


def test_command_line_help(capsys):
    with pytest.raises(SystemExit) as info:
        server_main(["--help"])
    assert info.value.code == 0
    assert "--root" in capsys.readouterr().out


def test_command_line_server(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    cmd = [sys.executable, "-m", "hf_instruct_tune.testing.hub_server", "--port", "0", "--root", str(tmp_path),
           "--token", "hf_cli_token", "--user", "dave", "--token", "erin:hf_erin"]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first_line = process.stdout.readline()
        url = first_line.split(" at ")[1].split()[0]
        assert HfApi(endpoint=url, token="hf_cli_token").whoami()["name"] == "dave"
        assert HfApi(endpoint=url, token="hf_erin").whoami()["name"] == "erin"
    finally:
        process.terminate()
        process.wait(timeout=10)
