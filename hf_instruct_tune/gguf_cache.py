"""A cache of GGUF checkpoints converted to transformers' format, so each later load skips the conversion.

Loading a ``.gguf`` file through transformers parses its metadata and dequantizes every tensor: about 18 s for
the embedded SmolLM2 on a 2-core CPU, in every process that loads it. The first load writes the dequantized
weights (safetensors) and the tokenizer under ``$HF_HOME/hf_instruct_tune/gguf/``, keyed by the file's path,
size and modification time, the dtype and the transformers version; later loads read that folder. Entries are
written to a staging folder and renamed into place, so a crash never leaves a partial entry. Set
``HF_INSTRUCT_TUNE_GGUF_CACHE=0`` to turn the cache off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

COMPLETE_MARKER = ".complete"


def cache_enabled() -> bool:
    return os.environ.get("HF_INSTRUCT_TUNE_GGUF_CACHE", "1").lower() not in {"0", "false", "no", "off"}


def _cache_root() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "hf_instruct_tune" / "gguf"


def entry_folder(gguf_path: Path, part: str, dtype: str = "") -> Path:
    """The cache folder of one converted ``part`` (``"model"`` or ``"tokenizer"``) of ``gguf_path``."""
    import transformers

    stat = gguf_path.stat()
    key = "|".join([str(gguf_path.resolve()), str(stat.st_size), str(stat.st_mtime_ns), part, dtype,
                    transformers.__version__])
    return _cache_root() / f"{gguf_path.stem}-{part}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def cached(gguf_path: Path, part: str, dtype: str = "") -> Path | None:
    """The converted folder when a complete entry exists and the cache is on, else None."""
    if not cache_enabled():
        return None
    folder = entry_folder(gguf_path, part, dtype)
    return folder if (folder / COMPLETE_MARKER).is_file() else None


def store(gguf_path: Path, part: str, obj, dtype: str = "") -> None:
    """Save ``obj`` (a model or tokenizer, with ``save_pretrained``) as the cache entry; never fails the caller."""
    if not cache_enabled():
        return
    target = entry_folder(gguf_path, part, dtype)
    staging = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        obj.save_pretrained(staging)
        (staging / COMPLETE_MARKER).write_text("")
        os.replace(staging, target)
        staging = None
    except OSError as error:  # a full or read-only disk: the next load converts again
        logger.debug("GGUF cache entry not written (%s)", error)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
