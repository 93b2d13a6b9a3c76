"""``hf instruct-tune ...``: this CLI as an extension of the Hugging Face ``hf`` command.

``hf`` (huggingface_hub 1.x and later) runs ``hf NAME ARGS`` through the extension registered under
``~/.local/share/hf/extensions/hf-NAME/manifest.json``, whose ``executable_path`` it calls with ``ARGS``.
:func:`register` writes that manifest for the ``hf-instruct-tune`` script installed with this package;
``hf extensions remove instruct-tune`` undoes it. ``hf extensions update`` does not update it: pip does.
"""

from __future__ import annotations

import json
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

from .errors import InputError

EXTENSION_NAME = "instruct-tune"
SCRIPT_NAME = "hf-instruct-tune"
_MARKER = "hf_instruct_tune"  # the manifest's `repo_id`: an extension this package registered


def extensions_root() -> Path:
    """Where ``hf`` looks for extensions (its own constant where it has one)."""
    try:
        from huggingface_hub.cli.extensions import EXTENSIONS_ROOT
    except ImportError:
        EXTENSIONS_ROOT = Path("~/.local/share/hf/extensions")
    return Path(EXTENSIONS_ROOT).expanduser()


def installed_script() -> Path:
    """The ``hf-instruct-tune`` console script of this installation."""
    beside_python = Path(sys.executable).parent / SCRIPT_NAME
    found = beside_python if beside_python.is_file() else shutil.which(SCRIPT_NAME)
    if not found:
        raise InputError(f"the '{SCRIPT_NAME}' script is not installed next to {sys.executable} nor on PATH; "
                         "reinstall the package with pip")
    return Path(found).resolve()


def register(script: Path | None = None) -> Path:
    """Register ``script`` (default: this installation's) as ``hf instruct-tune``; returns the manifest's path."""
    script = Path(script) if script is not None else installed_script()
    folder = extensions_root() / f"hf-{EXTENSION_NAME}"
    manifest_path = folder / "manifest.json"
    if manifest_path.exists() and _registered_by_us(manifest_path) is False:
        raise InputError(f"another `hf {EXTENSION_NAME}` extension is installed there; remove it first with "
                         f"`hf extensions remove {EXTENSION_NAME}`", source=str(folder))
    manifest = {
        "owner": "pypi", "repo": SCRIPT_NAME, "repo_id": _MARKER, "short_name": EXTENSION_NAME,
        "executable_path": str(script), "type": "python", "installed_at": datetime.now(timezone.utc).isoformat(),
        "description": "Instruction fine-tuning with EOS-safe labels (the hf_instruct_tune package; update it with pip)",
        "commit_sha": None,
    }
    folder.mkdir(parents=True, exist_ok=True)
    staged = manifest_path.with_suffix(".json.tmp")
    staged.write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
    staged.replace(manifest_path)
    return manifest_path


def _registered_by_us(manifest_path: Path) -> bool | None:
    try:
        return json.loads(manifest_path.read_text(encoding="utf-8")).get("repo_id") == _MARKER
    except (OSError, ValueError, AttributeError):
        return None
