"""The model card (README.md) of an adapter or merged model, rendered from ``hf_instruct_tune.json``.

The body comes from ``cards/adapter.md.jinja`` rendered in a sandbox; the YAML header is built with
``huggingface_hub.ModelCardData`` and the result parsed back with ``ModelCard``, so it validates on the Hub.
Nothing local leaks into it: ``base_model`` is a Hub id or absent, the dataset is named by its basename,
absolute paths and tokens are scrubbed from every text that came from the run.
"""

from __future__ import annotations

import importlib.resources
import os
import re
import shlex
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..metadata import METADATA_FILE_NAME, TrainingMetadata, write_text_atomic
from .plot import PLOT_FILE_NAME, plot_loss_curve

CARD_TEMPLATE = "adapter.md.jinja"
BASE_TAGS = ["lora", "sft", "hf-instruct-tune"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{8,}\b")
_HYPERPARAMETERS = [  # (metadata key, label)
    ("learning_rate", "learning rate"), ("lr_scheduler", "learning-rate schedule"), ("warmup_steps", "warm-up steps"),
    ("weight_decay", "weight decay"), ("optimizer", "optimizer"), ("max_steps", "max steps"), ("epochs", "epochs"),
    ("batch_size", "batch size (per device)"), ("grad_accum", "gradient accumulation"),
    ("world_size", "processes"), ("max_length", "max sequence length"), ("seed", "seed"), ("backend", "backend"),
    ("load_in_4bit", "4-bit base (QLoRA)"), ("packing", "packing"), ("fused_loss", "fused loss"),
    ("train_on_prompt", "loss on prompt tokens"),
]


@lru_cache(maxsize=1)
def _environment():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=StrictUndefined,
                                         keep_trailing_newline=True, autoescape=False)


def _template_source() -> str:
    return importlib.resources.files("hf_instruct_tune.cards").joinpath(CARD_TEMPLATE).read_text(encoding="utf-8")


def is_hub_id(value: str | None) -> bool:
    """Whether ``value`` looks like ``namespace/name`` and is not a path that exists here."""
    return bool(value) and bool(_HUB_ID.match(value)) and not os.path.exists(value)


def scrub(text: str, folder: str | Path | None = None) -> str:
    """Remove things that must never reach a public card: tokens and absolute local paths."""
    text = _TOKEN.sub("hf_***", text)
    for root in filter(None, [str(Path(folder).resolve()) if folder else None, str(Path.home()), os.getcwd()]):
        if len(root) > 1:
            text = text.replace(root + os.sep, "").replace(root, ".")
    return text


def load_metadata(folder: str | Path) -> TrainingMetadata:
    return TrainingMetadata.load(folder)


def build_card_data(meta: TrainingMetadata, *, license: str | None = None, language: list[str] | None = None,
                    base_model: str | None = None, relation: str = "adapter"):
    """The YAML header: library, pipeline, base model (Hub id only), tags, datasets, license, language."""
    from huggingface_hub import ModelCardData

    base = base_model or meta.base_model
    if base is not None and not is_hub_id(base):
        raise InputError(f"base model should be a Hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct', got '{base}'. "
                         "Pass --base-model ID to name it.", field="base_model")
    tags = list(BASE_TAGS)
    if (meta.training or {}).get("backend") == "unsloth":
        tags.append("unsloth")
    dataset = meta.dataset or {}
    kwargs: dict[str, Any] = {
        "library_name": "transformers" if relation == "merge" else "peft",
        "pipeline_tag": "text-generation",
        "tags": tags,
    }
    if base:
        kwargs["base_model"] = base
        kwargs["base_model_relation"] = relation
    if dataset.get("is_hub_dataset") and dataset.get("name"):
        kwargs["datasets"] = [dataset["name"]]
    if license or meta.license:
        kwargs["license"] = license or meta.license
    if language or meta.language:
        kwargs["language"] = list(language or meta.language or [])
    return ModelCardData(**kwargs)


def _tokenizer_bos(folder: Path) -> str | None:
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    bos = _tokenizer_config(config).get("bos_token")
    return bos.get("content") if isinstance(bos, dict) else bos


def _python_usage(*, repo_ref: str, base_model: str | None, merged: bool, prompt: str, stop_token: str | None,
                  stop_is_eos: bool, prompt_has_bos: bool) -> str:
    base = base_model or "path/to/the/base-model"
    lines = ["from transformers import AutoModelForCausalLM, AutoTokenizer"]
    if not merged:
        lines = ["from peft import PeftModel", *lines]
    lines.append("")
    lines.append(f"tokenizer = AutoTokenizer.from_pretrained({repo_ref!r})")
    if merged:
        lines.append(f"model = AutoModelForCausalLM.from_pretrained({repo_ref!r})")
    else:
        lines.append(f"base = AutoModelForCausalLM.from_pretrained({base!r})")
        lines.append(f"model = PeftModel.from_pretrained(base, {repo_ref!r})")
    lines += ["", "# The prompt, in the training format (see 'Prompt format' above)", f"prompt = {prompt!r}"]
    special = "False" if prompt_has_bos else "True"
    lines.append(f"inputs = tokenizer(prompt, return_tensors=\"pt\", add_special_tokens={special})")
    if stop_is_eos:
        lines.append("stop_id = tokenizer.eos_token_id")
    else:
        lines.append(f"stop_id = tokenizer.convert_tokens_to_ids({stop_token!r})  # the template's stop token")
    lines += [
        "output = model.generate(**inputs, max_new_tokens=256, eos_token_id=stop_id, do_sample=False)",
        "print(tokenizer.decode(output[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))",
    ]
    return "\n".join(lines)


def render_card(folder: str | Path, *, repo_id: str | None = None, license: str | None = None,
                language: list[str] | None = None, base_model: str | None = None, merged: bool = False,
                metadata: TrainingMetadata | None = None, has_plot: bool | None = None):
    """Render the card of the adapter (or merged model) in ``folder``; returns a ``huggingface_hub.ModelCard``."""
    from huggingface_hub import ModelCard

    folder = Path(folder)
    meta = metadata or load_metadata(folder)
    card_data = build_card_data(meta, license=license, language=language, base_model=base_model,
                                relation="merge" if merged else "adapter")
    base = card_data.base_model
    template = meta.template or {}
    stop = template.get("stop_token")
    stop_is_eos = stop in (None, "", "eos_token")
    if stop_is_eos:
        stop = _special_token(folder, "eos_token")
    example = meta.example or {}
    prompt = example.get("rendered_prompt") or ""
    bos = _tokenizer_bos(folder)
    repo_ref = repo_id or ("your-username/" + (folder.resolve().name or "adapter"))
    instruction = example.get("instruction") or "Summarize the text."
    training = meta.training or {}
    results = meta.results or {}
    runtime = results.get("train_runtime_s")
    evaluation = results.get("eval") or {}
    if has_plot is None:
        has_plot = (folder / PLOT_FILE_NAME).is_file()
    context = {
        "card_data": card_data.to_yaml(),
        "title": repo_ref.split("/")[-1],
        "merged": merged,
        "base_model": base,
        "repo_ref": repo_ref,
        "template_name": template.get("name") or "custom",
        "template_text": (template.get("text") or "").rstrip("\n"),
        "template_is_model": str(template.get("name") or "").split(":")[0] == "model",
        "serves_chat_template": (folder / "chat_template.jinja").is_file(),
        "stop_is_eos": stop_is_eos,
        "stop_token": stop,
        "example_instruction": instruction,
        "example_input": example.get("input") or "",
        "example_instruction_shell": shlex.quote(instruction),
        "example_prompt": prompt.rstrip("\n") if prompt else "(no example was recorded)",
        "python_usage": _python_usage(repo_ref=repo_ref, base_model=base, merged=merged, prompt=prompt,
                                      stop_token=stop, stop_is_eos=stop_is_eos,
                                      prompt_has_bos=bool(bos) and prompt.startswith(bos)),
        "dataset": {"name": None, "rows": None, "sha256": None, "is_hub_dataset": False, **(meta.dataset or {})},
        "formatter": meta.formatter,
        "lora": {k: ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else v
                 for k, v in (meta.lora or {}).items() if v is not None},
        "hyperparameters": [(label, training[key]) for key, label in _HYPERPARAMETERS if training.get(key) is not None
                            and not (key == "max_steps" and training[key] <= 0)],
        "changed": ([(k, ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else v)
                     for k, v in training["changed"].items()] if isinstance(training.get("changed"), dict) else None),
        "steps_done": results.get("global_step"),
        "epochs_done": _round(results.get("epochs_done")),
        "rows_seen": results.get("rows_seen"),
        "first_loss": _round(results.get("first_loss")),
        "final_loss": _round(results.get("final_loss")),
        "best_loss": _round(results.get("best_loss")),
        "mean_loss": _round(results.get("train_loss")),
        "logged_losses": len(results.get("loss_history") or []),
        "runtime": f"{runtime:.0f} s" if isinstance(runtime, (int, float)) else None,
        "eval_results": [(k, _round(v)) for k, v in evaluation.items()] if isinstance(evaluation, dict) else [],
        "best_checkpoint_step": results.get("best_checkpoint_step"),
        "has_plot": has_plot,
        "versions": dict(meta.versions or {}),
        "language": card_data.language,
        "license": card_data.license,
    }
    # dataset names that are local files are shown by basename only
    if context["dataset"].get("name") and not context["dataset"].get("is_hub_dataset"):
        context["dataset"]["name"] = context["dataset"].get("path_name") or Path(str(context["dataset"]["name"])).name
    text = _environment().from_string(_template_source()).render(context)
    text = re.sub(r"\n{3,}", "\n\n", scrub(text, folder))
    return ModelCard(text)


def _tokenizer_config(path: Path) -> dict:
    """The tokenizer config as a dict; empty when it is missing, too large or not a JSON object."""
    from ..adapter_folder import MAX_TOKENIZER_FILE, read_json_object

    try:
        return read_json_object(path, MAX_TOKENIZER_FILE)
    except InputError:
        return {}


def _special_token(folder: Path, key: str) -> str | None:
    config = folder / "tokenizer_config.json"
    value = _tokenizer_config(config).get(key) if config.is_file() else None
    return value.get("content") if isinstance(value, dict) else value


def _round(value):
    return round(value, 4) if isinstance(value, float) else value


def existing_card_overrides(folder: str | Path) -> dict:
    """License, language and base model set in an existing README.md header (e.g. by ``card --license``)."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(readme, ignore_metadata_errors=True).data
    except Exception:  # a hand-written README without a valid header: nothing to keep
        return {}
    overrides = {}
    if getattr(data, "license", None):
        overrides["license"] = data.license
    if getattr(data, "language", None):
        overrides["language"] = [data.language] if isinstance(data.language, str) else list(data.language)
    if is_hub_id(getattr(data, "base_model", None) if isinstance(getattr(data, "base_model", None), str) else None):
        overrides["base_model"] = data.base_model
    return overrides


def write_card(folder: str | Path, *, repo_id: str | None = None, license: str | None = None,
               language: list[str] | None = None, base_model: str | None = None, merged: bool = False,
               plot: bool = True) -> Path:
    """(Re)write ``folder/README.md`` and, with matplotlib, ``folder/loss_curve.png``; return the README path."""
    folder = Path(folder)
    if not (folder / METADATA_FILE_NAME).is_file():
        raise InputError(f"no {METADATA_FILE_NAME} here, so there is nothing to describe; train with "
                         "'hf-instruct-tune train' first, or point at the adapter folder it wrote", source=str(folder))
    meta = load_metadata(folder)
    kept = existing_card_overrides(folder)
    license, language, base_model = license or kept.get("license"), language or kept.get("language"), base_model or kept.get("base_model")
    has_plot = None
    if plot:
        has_plot = plot_loss_curve((meta.results or {}).get("loss_history") or [], folder / PLOT_FILE_NAME) is not None
    card = render_card(folder, repo_id=repo_id, license=license, language=language, base_model=base_model,
                       merged=merged, metadata=meta, has_plot=has_plot)
    path = folder / "README.md"
    write_text_atomic(path, str(card))
    return path
