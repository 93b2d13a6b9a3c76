"""Round trip through the local Hub: upload a LoRA adapter with the CLI, load it back by repo id elsewhere."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub import HfApi

from hf_instruct_tune.cli import main
from hf_instruct_tune.metadata import TrainingMetadata
from hf_instruct_tune.testing.tiny import save_tiny_checkpoint

INPUT_IDS = [[1, 5, 9, 42, 17, 3, 8]]


@pytest.fixture
def tiny_adapter(tmp_path):
    """A tiny random base, and a LoRA adapter on it with non-zero weights, saved like 'train' saves one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = save_tiny_checkpoint(tmp_path / "base")
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(adapter_dir)
    (adapter_dir / "prompt_template.jinja").write_text("### Instruction:\n{{ instruction }}\n\n### Response:\n")
    TrainingMetadata(
        base_model="alice/tiny-base", base_model_source="hub",
        dataset={"name": "train.jsonl", "path_name": "train.jsonl", "rows": 3, "sha256": "0" * 64, "is_hub_dataset": False},
        template={"name": "alpaca-no-input", "text": "### Instruction:\n{{ instruction }}\n\n### Response:\n", "stop_token": "eos_token"},
        lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        results={"loss_history": [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}], "final_loss": 4.0, "best_loss": 4.0},
        example={"instruction": "Say yes", "input": "", "rendered_prompt": "### Instruction:\nSay yes\n\n### Response:\n"},
    ).save(adapter_dir)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor(INPUT_IDS)).logits
    return base_dir, adapter_dir, logits


def publish(hub_server, base_dir, adapter_dir):
    """The base as alice/tiny-base (plain upload) and the adapter as alice/tiny-adapter (the `upload` command)."""
    api = HfApi(endpoint=hub_server.url, token=hub_server.token)
    api.create_repo("alice/tiny-base")
    api.upload_folder(repo_id="alice/tiny-base", folder_path=base_dir)
    assert main(["upload", "alice/tiny-adapter", str(adapter_dir), "--endpoint", hub_server.url,
                 "--token", hub_server.token]) == 0


def test_upload_then_load_by_repo_id_in_fresh_process(hub_server, tiny_adapter, tmp_path):
    base_dir, adapter_dir, local_logits = tiny_adapter
    publish(hub_server, base_dir, adapter_dir)

    out = tmp_path / "remote_logits.pt"
    code = textwrap.dedent(
        f"""
        import torch
        from huggingface_hub import ModelCard, hf_hub_download
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        card = ModelCard.load(hf_hub_download("alice/tiny-adapter", "README.md"))
        assert card.data.library_name == "peft" and card.data.base_model == "alice/tiny-base", card.data
        base = AutoModelForCausalLM.from_pretrained("alice/tiny-base")
        model = PeftModel.from_pretrained(base, "alice/tiny-adapter").eval()
        with torch.no_grad():
            torch.save(model(torch.tensor({INPUT_IDS})).logits, {str(out)!r})
        """
    )
    env = hub_server.env(HF_HOME=str(tmp_path / "fresh_hf_home"))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(out), local_logits)


def test_generate_with_a_repo_id_matches_the_local_folder(hub_server, tiny_adapter, capsys):
    base_dir, adapter_dir, _ = tiny_adapter
    publish(hub_server, base_dir, adapter_dir)
    capsys.readouterr()
    answers = []
    for adapter in ("alice/tiny-adapter", str(adapter_dir)):
        assert main(["generate", "--adapter", adapter, "--instruction", "Say yes", "--max-new-tokens", "4"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and answers[0].strip()


def test_generate_runs_the_adapter_not_the_base(tiny_adapter):
    from transformers import AutoModelForCausalLM

    from hf_instruct_tune.generation import AdapterGenerator

    base_dir, adapter_dir, adapter_logits = tiny_adapter
    generator = AdapterGenerator(adapter_dir, model=str(base_dir))
    with torch.no_grad():
        logits = generator.model(torch.tensor(INPUT_IDS)).logits
        base_logits = AutoModelForCausalLM.from_pretrained(base_dir).eval()(torch.tensor(INPUT_IDS)).logits
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-3)
    torch.testing.assert_close(logits, adapter_logits)


def test_export_merged_matches_adapter(tiny_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    base_dir, adapter_dir, adapter_logits = tiny_adapter
    merged_dir = tmp_path / "merged"
    assert main(["export", "--adapter", str(adapter_dir), "--merged", str(merged_dir), "--base", str(base_dir)]) == 0
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer_config.json").is_file()
    readme = (merged_dir / "README.md").read_text()
    assert "base_model_relation: merge" in readme and "library_name: transformers" in readme
    assert str(tmp_path) not in readme
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(torch.tensor(INPUT_IDS)).logits, adapter_logits, rtol=1e-4, atol=1e-4)
    assert main(["export", "--adapter", str(adapter_dir), "--merged", str(merged_dir), "--base", str(base_dir)]) == 2
