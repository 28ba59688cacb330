"""The HF hub as a model's or tokenizer's source: what to say when a name that is no local folder cannot be loaded,
a missing path or a hub id while the hub cannot be reached."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import HFValidationError, validate_repo_id

# transformers' words when neither the hub nor the local cache has the files (HF_HUB_OFFLINE=1, or no connection)
UNREACHABLE = ("couldn't connect to", "offline mode", "cannot reach", "outgoing traffic has been disabled")


def unreachable_hub_problem(name: str, err: BaseException, flag: str) -> str | None:
    """Why ``name`` (given as ``flag``) did not load when it is no local folder: a path that does not exist, or a hub
    id while the hub cannot be reached, and how to use a local folder instead; None for a local folder or another
    failure."""
    if Path(name).expanduser().exists():
        return None
    if not is_hub_id(name):
        return f"{flag} {name!r}: no such folder (nor a hub id); give a folder written by save_pretrained"
    offline = hub_constants.HF_HUB_OFFLINE
    if not offline and not any(text in str(err).lower() for text in UNREACHABLE):
        return None
    why = "HF_HUB_OFFLINE=1 is set" if offline else "no connection to huggingface.co"
    return (f"{flag} {name!r} is no local folder, so it was taken as a hub id, and the HF hub is unreachable ({why}) "
            f"with no copy in the local cache: on a machine that reaches the hub, download it (hf download {name} "
            f"--local-dir DIR, or save_pretrained(DIR)), copy DIR here and pass {flag} DIR")


def is_hub_id(name: str) -> bool:
    """Whether ``name`` can be a hub repository id ("name" or "owner/name"), not only a path ("/data/model",
    "./model", "a/b/c")."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not name.startswith((".", "~"))
