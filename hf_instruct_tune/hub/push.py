"""Publishing an adapter folder to the Hub in one commit: weights, tokenizer, template, metadata, card, plot.

Token: ``token`` argument > ``HF_TOKEN`` > the saved login (``hf auth login``). Endpoint: ``endpoint``
argument > ``HF_ENDPOINT``, always passed explicitly to ``HfApi``. The token is never printed, logged or written.
An endpoint on this machine (``localhost``, ``127.0.0.1``, ``::1``) is used even with ``HF_HUB_OFFLINE=1``,
and over Git LFS (Xet off), as a local Hub-compatible server expects.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from ..errors import PublishError
from ..metadata import METADATA_FILE_NAME
from ..outputs import ADAPTER_FILE, is_run_file, run_files, untrained_lora

logger = logging.getLogger(__name__)

DEFAULT_COMMIT_MESSAGE = "Upload adapter with hf-instruct-tune"
# Trainer checkpoints, logs and caches are not part of a published adapter.
DEFAULT_IGNORE = [".git/*", ".git", ".cache/*", "*/.cache/*", "__pycache__/*", "checkpoint-*", "checkpoint-*/*",
                  "checkpoints/*", "runs/*", "*.lock", ".DS_Store", "training_args.bin"]
CARD_FILES = ("README.md", "loss_curve.png")
_TOKEN_LIKE = re.compile(r"\bhf_[A-Za-z0-9]{8,}\b")
_LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}
_NO_CHANGES = "No files have been modified since last commit"
UPLOAD_TOKEN_HINT = "pass --token"


def is_local_endpoint(endpoint: str) -> bool:
    """Whether ``endpoint`` is a server on this machine."""
    return (urlparse(endpoint).hostname or "").lower() in _LOOPBACK_HOSTS


@contextmanager
def reachable(endpoint: str) -> Iterator[None]:
    """Let ``huggingface_hub`` talk to a local ``endpoint`` in offline mode (over LFS); other endpoints unchanged."""
    from huggingface_hub import constants

    if not is_local_endpoint(endpoint):
        yield
        return
    saved = constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET
    constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET = False, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET = saved


class _NoChangesFilter(logging.Filter):
    """Swallows huggingface_hub's "No files have been modified" warning, remembering that it came."""

    seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if _NO_CHANGES in record.getMessage():
            self.seen = True
            return False
        return True


def _how_to_log_in(token_hint: str | None) -> str:
    if token_hint is None:
        return "Run 'hf auth login' or set HF_TOKEN."
    return f"Run 'hf auth login', set HF_TOKEN, or {token_hint}."


def resolve_token(token: str | None = None) -> str | None:
    """``token`` > ``HF_TOKEN`` > the token saved by ``hf auth login``."""
    if token:
        return token
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    from huggingface_hub import get_token

    return get_token()


def resolve_endpoint(endpoint: str | None = None) -> str:
    """``endpoint`` > ``HF_ENDPOINT`` > the public Hub."""
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _safe(text: str, token: str | None) -> str:
    if token:
        text = text.replace(token, "***")
    return _TOKEN_LIKE.sub("hf_***", text)


def _first_line(error: BaseException, token: str | None) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    response = getattr(error, "response", None)
    server = response.headers.get("X-Error-Message") if response is not None else None
    return _safe(server or (lines[0] if lines else type(error).__name__), token)


def _status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def check_write_access(repo_id: str, token: str | None = None, endpoint: str | None = None, *,
                       token_hint: str | None = UPLOAD_TOKEN_HINT) -> str:
    """Fail fast, before training, if ``repo_id`` cannot be pushed to; return the full ``namespace/name``.

    Checks that a token exists, that the Hub accepts it, that it may write, and that the namespace is the
    user's or one of their organizations'. ``token_hint`` is how the caller's user passes a token
    (``"pass --token"`` for ``upload``; ``None`` where only ``HF_TOKEN`` and the login exist), for the messages.
    """
    from huggingface_hub import HfApi

    token = resolve_token(token)
    endpoint = resolve_endpoint(endpoint)
    if not token:
        raise PublishError(f"Not logged in, so cannot push to '{repo_id}'. {_how_to_log_in(token_hint)}")
    try:
        with reachable(endpoint):
            info = HfApi(endpoint=endpoint, token=token, library_name="hf_instruct_tune").whoami()
    except Exception as error:  # network errors and HTTP errors alike
        if _status(error) == 401:
            other = f", or {token_hint} with a valid one" if token_hint else ""
            raise PublishError(f"The token was rejected by {endpoint} (401). Run 'hf auth login --force' with a "
                               f"valid token, or set a valid HF_TOKEN{other}.") from None
        raise PublishError(f"Cannot check access to {endpoint}: {_first_line(error, token)}. Check your network, "
                           "or --endpoint / HF_ENDPOINT.") from None
    user = info.get("name") or ""
    role = ((info.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise PublishError(f"The token for '{user}' is read-only. Create a token with write access "
                           "(https://huggingface.co/settings/tokens) and run 'hf auth login --force'.")
    full_id = repo_id if "/" in repo_id else f"{user}/{repo_id}"
    namespace = full_id.split("/")[0]
    orgs = {org.get("name") for org in info.get("orgs") or []}
    if namespace != user and namespace not in orgs:
        raise PublishError(f"Logged in as '{user}', who cannot write to namespace '{namespace}'. Use a repo id "
                           f"like '{user}/{full_id.split('/')[-1]}', or log in as a member of '{namespace}'.")
    return full_id


def _collect_files(folder: Path, include: list[str] | None, exclude: list[str] | None, skip: set[str]) -> list[Path]:
    from huggingface_hub.utils import filter_repo_objects

    relative = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    relative = [p for p in relative if p not in skip]
    kept = filter_repo_objects(relative, allow_patterns=include or None, ignore_patterns=[*DEFAULT_IGNORE, *(exclude or [])])
    return [folder / p for p in kept]


def _run_files_only(folder: Path, paths: list[Path], include: list[str] | None) -> list[Path]:
    """``paths`` less the files that the run in ``folder`` did not write, unless ``include`` names files to send."""
    if include is not None or not (folder / METADATA_FILE_NAME).is_file():
        return paths
    recorded = run_files(folder)
    kept = [path for path in paths if is_run_file(path.relative_to(folder).as_posix(), recorded)]
    left_out = [path.relative_to(folder).as_posix() for path in paths if path not in kept]
    if left_out:
        logger.info("Not uploading %s: not written by train. Name files with --include to publish them.",
                    ", ".join(left_out))
    return kept


def push_adapter(folder: str | Path, repo_id: str, *, token: str | None = None, endpoint: str | None = None,
                 private: bool = False, revision: str | None = None, create_pr: bool = False,
                 commit_message: str | None = None, include: list[str] | None = None,
                 exclude: list[str] | None = None, path_in_repo: str | None = None, card: bool = True,
                 token_hint: str | None = UPLOAD_TOKEN_HINT, force: bool = False):
    """Create ``repo_id`` if needed and upload ``folder`` (or one file) in a single commit; return its ``CommitInfo``.

    From a folder ``train`` wrote, only the files the run wrote are uploaded (and the card); other files
    there only when ``include`` names them. An adapter whose LoRA weights never moved from their
    initialization (every ``lora_B`` is 0, the base model unchanged) is refused unless ``force``.

    Returns ``None``, after logging it once, when the repo already holds exactly these files (no commit is made).
    With ``card`` (and an ``hf_instruct_tune.json`` in the folder), README.md and loss_curve.png are
    regenerated for this repo id and uploaded with the adapter, keeping a license, language or base model
    that an existing README.md header sets.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    if not folder.exists():
        raise PublishError(f"{folder}: no such file or folder. Train first ('hf-instruct-tune train ... --output-dir "
                           f"{folder}') or pass the adapter folder it wrote.")
    adapter_file = folder / ADAPTER_FILE if folder.is_dir() else folder
    if not force and adapter_file.name == ADAPTER_FILE and adapter_file.is_file() and untrained_lora(adapter_file):
        raise PublishError(f"{adapter_file}: the adapter never moved from its initialization (every LoRA B matrix is "
                           "0), so it is the base model unchanged, not a trained model. Train longer (more "
                           "--max-steps than --warmup-steps, or a higher --lr), or pass --force to upload it anyway.")
    token = resolve_token(token)
    endpoint = resolve_endpoint(endpoint)
    repo_id = check_write_access(repo_id, token, endpoint, token_hint=token_hint)
    if create_pr and revision not in (None, "main"):
        raise PublishError("--create-pr opens a pull request against main; drop --revision, or drop --create-pr.")
    api = HfApi(endpoint=endpoint, token=token, library_name="hf_instruct_tune")
    prefix = (path_in_repo or "").strip("/")

    operations = []
    with tempfile.TemporaryDirectory(prefix="hf-instruct-tune-card-") as scratch:
        if folder.is_file():
            target = prefix or folder.name
            operations.append(CommitOperationAdd(path_in_repo=target, path_or_fileobj=str(folder)))
        else:
            regenerate = card and (folder / METADATA_FILE_NAME).is_file()
            skip = set(CARD_FILES) if regenerate else set()
            for path in _run_files_only(folder, _collect_files(folder, include, exclude, skip), include):
                name = path.relative_to(folder).as_posix()
                content = _portable_adapter_config(path) if path.name == "adapter_config.json" else None
                operations.append(CommitOperationAdd(path_in_repo=f"{prefix}/{name}" if prefix else name,
                                                     path_or_fileobj=content if content is not None else str(path)))
            if regenerate:
                operations += _card_operations(folder, Path(scratch), repo_id, prefix)
        if not operations:
            raise PublishError(f"Nothing to upload from {folder}: no file matches --include/--exclude.")
        no_changes = _NoChangesFilter()
        hub_logger = logging.getLogger("huggingface_hub.hf_api")
        hub_logger.addFilter(no_changes)
        try:
            with reachable(endpoint):
                api.create_repo(repo_id, private=private, exist_ok=True)
                if revision and revision != "main" and not revision.startswith("refs/") and not create_pr:
                    api.create_branch(repo_id, branch=revision, exist_ok=True)
                info = api.create_commit(repo_id, operations, commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
                                         revision=revision, create_pr=create_pr)
        except PublishError:
            raise
        except Exception as error:
            raise _publish_error(error, repo_id, endpoint, token, token_hint) from None
        finally:
            hub_logger.removeFilter(no_changes)
    if no_changes.seen:
        logger.info("Nothing to push: %s (%s) already holds these %d file(s).", repo_id, revision or "main",
                    len(operations))
        return None
    logger.info("Pushed %d file(s) to %s", len(operations), info.pr_url or info.commit_url)
    return info


def _portable_adapter_config(path: Path) -> bytes | None:
    """The adapter config with a local base-model path replaced by the recorded Hub id (or removed).

    ``None`` when the file needs no change. A local path would be useless, and private, on the Hub.
    """
    import json

    from .card import is_hub_id

    from ..adapter_folder import read_json_object

    config = read_json_object(path)
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base or is_hub_id(base):
        return None
    recorded = None
    if (path.parent / METADATA_FILE_NAME).is_file():
        from ..metadata import TrainingMetadata

        recorded = TrainingMetadata.load(path.parent).base_model
    config["base_model_name_or_path"] = recorded if is_hub_id(recorded) else None
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _card_operations(folder: Path, scratch: Path, repo_id: str, prefix: str) -> list:
    from huggingface_hub import CommitOperationAdd

    from .card import existing_card_overrides, render_card
    from .plot import PLOT_FILE_NAME, plot_loss_curve
    from ..metadata import TrainingMetadata

    meta = TrainingMetadata.load(folder)
    plot = plot_loss_curve((meta.results or {}).get("loss_history") or [], scratch / PLOT_FILE_NAME)
    card = render_card(folder, repo_id=repo_id, metadata=meta, has_plot=plot is not None,
                       **existing_card_overrides(folder))
    join = (lambda name: f"{prefix}/{name}") if prefix else (lambda name: name)
    operations = [CommitOperationAdd(path_in_repo=join("README.md"), path_or_fileobj=str(card).encode("utf-8"))]
    if plot is not None:
        operations.append(CommitOperationAdd(path_in_repo=join(PLOT_FILE_NAME), path_or_fileobj=plot.read_bytes()))
    return operations


def _publish_error(error: Exception, repo_id: str, endpoint: str, token: str | None,
                   token_hint: str | None = UPLOAD_TOKEN_HINT) -> PublishError:
    status = _status(error)
    detail = _first_line(error, token)
    if status == 401:
        return PublishError(f"Not authorized to push to '{repo_id}' on {endpoint} (401: {detail}). "
                            f"{_how_to_log_in(token_hint)}")
    if status == 403:
        return PublishError(f"No write access to '{repo_id}' on {endpoint} (403: {detail}). Use a namespace you "
                            "own, or ask for write access; 'hf auth whoami' shows who you are logged in as.")
    if status == 404:
        return PublishError(f"Not found while pushing to '{repo_id}' on {endpoint} (404: {detail}). Check the repo "
                            "id and --revision.")
    if status is not None:
        return PublishError(f"The Hub refused the upload to '{repo_id}' ({status}: {detail}).")
    return PublishError(f"Upload to '{repo_id}' on {endpoint} failed: {detail}. Check your network, or "
                        "--endpoint / HF_ENDPOINT, and run the command again (unchanged files are skipped).")
