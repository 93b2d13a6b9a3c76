"""Merging a LoRA adapter into its base model, saved as safetensors with tokenizer, template and card."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ..errors import InputError
from ..metadata import METADATA_FILE_NAME, TrainingMetadata

logger = logging.getLogger(__name__)

CARRIED_FILES = (METADATA_FILE_NAME, "prompt_template.jinja")


def _load_base(name_or_path: str, base_model_id: str | None, dtype: str, allow_pickle: bool = False):
    from ..models import load_base_model, resolve_model

    return load_base_model(resolve_model(name_or_path, base_model_id=base_model_id), dtype=dtype,
                           allow_pickle=allow_pickle)


def export_merged(adapter_dir: str | Path, output_dir: str | Path, *, base: str | None = None, dtype: str = "auto",
                  card: bool = True, overwrite: bool = False, allow_pickle: bool = False) -> Path:
    """Merge the adapter in ``adapter_dir`` into its base (``base`` or the recorded Hub id) and save to ``output_dir``."""
    from ..adapter_folder import check_adapter_folder, load_adapter, load_tokenizer
    from ..outputs import file_state, make_readable, written_since

    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    check_adapter_folder(adapter_dir, allow_pickle=allow_pickle)  # it may come from anyone's Hub repo
    meta = TrainingMetadata.load(adapter_dir) if (adapter_dir / METADATA_FILE_NAME).is_file() else None
    base = base or (meta.base_model if meta else None)
    if not base:
        raise InputError("the base model was a local checkpoint, so its Hub id is unknown; pass --base PATH_OR_ID",
                         source=str(adapter_dir))
    for given, flag in ((adapter_dir, "--adapter"), (Path(base), "--base")):
        if given.exists() and output_dir.resolve() == given.resolve():
            raise InputError(f"is the {flag} folder; the merged model would be written over it, so choose another "
                             "--merged folder", source=str(output_dir), field="merged")
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise InputError("already exists and is not empty; choose another --merged folder or pass --overwrite",
                         source=str(output_dir))
    tokenizer = load_tokenizer(adapter_dir)
    model = _load_base(base, meta.base_model if meta else None, dtype, allow_pickle)
    merged = load_adapter(model, adapter_dir).merge_and_unload()
    before = file_state(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    for name in CARRIED_FILES:
        if (adapter_dir / name).is_file():
            shutil.copy2(adapter_dir / name, output_dir / name)
    if card and meta is not None:
        from .card import existing_card_overrides, write_card

        write_card(output_dir, merged=True, **existing_card_overrides(adapter_dir))
    for name in written_since(output_dir, before):
        make_readable(output_dir / name)
    logger.info("Merged model written to %s", output_dir)
    return output_dir
