"""``hf instruct-tune ...``: the ``hf`` command dispatches to this CLI once it is registered, offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hf_instruct_tune.errors import InputError


def hf_command() -> str:
    found = Path(sys.executable).parent / "hf"
    if found.is_file():
        return str(found)
    found = shutil.which("hf")
    if found is None:
        pytest.skip("the `hf` command (huggingface_hub) is not installed")
    return found


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_DISABLE_UPDATE_CHECK", "1")
    return tmp_path


def run_hf(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([hf_command(), *args], capture_output=True, text=True, env=os.environ.copy(), timeout=300)


def test_hf_dispatches_to_the_registered_cli(home, tmp_path):
    from hf_instruct_tune.cli import main

    assert main(["hf-extension"]) == 0
    manifest = json.loads((home / ".local/share/hf/extensions/hf-instruct-tune/manifest.json").read_text())
    assert Path(manifest["executable_path"]).name == "hf-instruct-tune"
    listed = run_hf("instruct-tune", "templates", "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[0].startswith("alpaca ")
    failed = run_hf("instruct-tune", "inspect", "--data", str(tmp_path / "missing.jsonl"))
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'missing.jsonl'}: no such file or directory"


def test_an_extension_this_package_did_not_write_is_left_alone(home):
    from hf_instruct_tune.hf_extension import register

    folder = home / ".local/share/hf/extensions/hf-instruct-tune"
    folder.mkdir(parents=True)
    theirs = json.dumps({"repo_id": "someone/hf-instruct-tune", "executable_path": "/bin/true"})
    (folder / "manifest.json").write_text(theirs)
    with pytest.raises(InputError, match="another `hf instruct-tune` extension"):
        register()
    assert (folder / "manifest.json").read_text() == theirs
