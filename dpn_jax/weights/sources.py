"""Reading DPN weights from what users have: safetensors, PyTorch checkpoints, hub repos.

Every reader returns a flat timm-named state dict of numpy arrays. PyTorch files are read with
`torch.load(weights_only=True)`, whose restricted unpickler refuses any global that is not a
tensor type, so a checkpoint cannot run code; safetensors cannot carry code at all.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpn_jax.errors import WeightsError, first_line
from dpn_jax.models.dpn import PRETRAINED_CFGS

StateDict = dict[str, np.ndarray]

SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".tar", ".ckpt")
HUB_PREFIX = "hf-hub:"
HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")  # preferred first, as timm
TIMM_HUB_OWNER = "timm/"
# How long the hub may take to answer before only the cache is used ($HF_HUB_ETAG_TIMEOUT, the
# hub's own setting for this request, overrides it).
HUB_PROBE_TIMEOUT_S = 3
_HUB_REPO = re.compile(r"[\w.-]+/[\w.-]+")
# Wrapper prefixes of DDP and torch.compile, in any order (timm's `clean_state_dict`).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Cadene `pretrainedmodels` DPNs call the classifier `last_linear`; otherwise timm's names.
_RENAMES = {"last_linear.": "classifier."}


class SourceError(WeightsError):
    """A weights source that cannot be read; the message is one line naming the source."""


@dataclass(frozen=True)
class Source:
    """A local checkpoint file and where it came from."""

    path: Path
    name: str  # as the user gave it (hub sources: `hf-hub:owner/repo/filename`)
    hub_repo: str | None = None


def resolve_source(src: str) -> Source:
    """A local checkpoint file, or a Hugging Face hub repository fetched into its cache.

    Only `hf-hub:owner/name`, `timm/<name>` and pretrained tags (`dpn92.mx_in1k`: its timm
    repository) are hub sources. Anything else, and anything that looks like a path (starts with
    `.`, `/` or `~`, ends in a checkpoint suffix, or sits in an existing directory), is a local
    file: a missing one fails at once instead of asking the hub.
    """
    if src.startswith(HUB_PREFIX):
        repo = src.removeprefix(HUB_PREFIX)
        if not _HUB_REPO.fullmatch(repo):
            raise SourceError(f"{src}: not a hub repository name (expected hf-hub:owner/name)")
        return download_from_hub(repo)
    path = Path(src).expanduser()
    if path.exists():
        if path.is_dir():
            hint = (
                " (a dpn_jax model directory: export it with --to-torch)"
                if (path / "metadata.json").exists()
                else ""
            )
            raise SourceError(f"{src} is a directory, not a checkpoint file{hint}")
        return Source(path, src)
    if not _looks_like_path(src):
        if src.startswith(TIMM_HUB_OWNER) and _HUB_REPO.fullmatch(src):
            return download_from_hub(src)
        hub_id = PRETRAINED_CFGS.get(src, {}).get("hf_hub_id")
        if hub_id:
            return download_from_hub(hub_id)
    hint = (
        f" (a hub repository is written {HUB_PREFIX}{src})"
        if _HUB_REPO.fullmatch(src) and not _looks_like_path(src)
        else ""
    )
    raise SourceError(f"{src}: no such file{hint}")


def _looks_like_path(src: str) -> bool:
    separators = tuple(sep for sep in (os.sep, os.altsep) if sep)
    if src.startswith((".", "~", *separators)):
        return True
    if src.lower().endswith((SAFETENSORS_SUFFIX, *TORCH_SUFFIXES)):
        return True
    parent = Path(src).parent
    return any(sep in src for sep in separators) and parent.is_dir()


def download_from_hub(repo: str) -> Source:
    """`model.safetensors` (else `pytorch_model.bin`) of a hub repo, via huggingface_hub's cache.

    huggingface_hub honours `HF_HUB_OFFLINE` / `HF_HOME` / `HF_HUB_CACHE` / `HF_ENDPOINT`. Its
    download retries a failed connection for tens of seconds, so the hub is first asked once,
    briefly: if it does not answer, only the cache is used, and a repository that is not there
    fails at once naming HF_HUB_OFFLINE and the local-file alternative.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    offline = bool(constants.HF_HUB_OFFLINE)
    unreachable = None if offline else _hub_unreachable(repo)
    local_only = offline or unreachable is not None
    for filename in HUB_FILENAMES:
        try:
            path = hf_hub_download(repo, filename, local_files_only=local_only)
        except LocalEntryNotFoundError as error:
            if local_only:
                continue
            unreachable = first_line(error.__cause__ or error)  # the connection failed later on
            break
        except EntryNotFoundError:
            continue
        except RepositoryNotFoundError:
            raise SourceError(f"hub repository {repo} not found (or private / gated)") from None
        return Source(Path(path), f"{HUB_PREFIX}{repo}/{filename}", hub_repo=repo)
    alternative = "or give a local checkpoint file (.safetensors / .pth) instead"
    if offline:
        raise SourceError(
            f"hub repository {repo} is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set: unset it to "
            f"download, {alternative}"
        )
    if unreachable is not None:
        raise SourceError(
            f"hub repository {repo}: cannot reach {constants.ENDPOINT} "
            f"({unreachable}) and it is not in the Hugging Face cache; without "
            f"network set HF_HUB_OFFLINE=1 (cache only), {alternative}"
        )
    raise SourceError(f"hub repository {repo} has none of {', '.join(HUB_FILENAMES)}")


def _hub_unreachable(repo: str) -> str | None:
    """Why the hub did not answer one quick, unretried request about `repo`; None if it did."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError

    # A failed connection raises the HTTP client's own error (httpx's, requests'), which is a
    # base class of HfHubHTTPError; an answer that is not the hub's (a proxy) is an HfHubHTTPError.
    no_answer = (OSError, HfHubHTTPError, *HfHubHTTPError.__bases__)
    timeout = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or HUB_PROBE_TIMEOUT_S)
    try:
        get_hf_file_metadata(hf_hub_url(repo, HUB_FILENAMES[0]), timeout=timeout)
    except (EntryNotFoundError, RepositoryNotFoundError):
        return None  # the hub answered; the download reports what is missing
    except no_answer as error:
        return first_line(error)
    return None


def read_state_dict(path: Path, *, ema: bool = False) -> StateDict:
    """The timm-named state dict in a checkpoint file, unwrapped, wrapper prefixes removed."""
    try:
        with open(path, "rb") as file:
            empty = not file.read(1)
    except OSError as error:  # permission, a special file, ...
        reason = error.strerror or first_line(error)
        raise SourceError(f"{path}: cannot be read ({reason})") from None
    if empty:
        raise SourceError(f"{path}: file is empty")
    name = path.name.lower()
    if name.endswith(SAFETENSORS_SUFFIX):
        checkpoint: Mapping[str, Any] = _read_safetensors(path)
    elif name.endswith(TORCH_SUFFIXES):
        checkpoint = _read_torch(path)
    else:
        raise SourceError(
            f"{path}: unknown checkpoint type; expected {SAFETENSORS_SUFFIX} or one of "
            f"{', '.join(TORCH_SUFFIXES)}"
        )
    return normalise_keys(unwrap(checkpoint, path, ema=ema), path)


def _read_safetensors(path: Path) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (SafetensorError, ValueError, TypeError) as error:
        raise SourceError(f"{path}: not a valid safetensors file ({first_line(error)})") from None


def _read_torch(path: Path) -> Any:
    try:
        import torch
    except ImportError:
        raise SourceError(
            f"{path}: reading PyTorch checkpoints needs torch "
            "(pip install 'dpn_jax[torch]'), or convert the file to .safetensors"
        ) from None
    try:
        # timm's training checkpoints keep their argparse.Namespace `args`; timm allows it too.
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _refusal_reason(error)
        if "GLOBAL" not in reason:  # damaged or not a pickle at all
            raise SourceError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
        raise SourceError(
            f"{path}: refused by torch's weights-only unpickler ({reason}); "
            "nothing in it was run (prefer .safetensors)"
        ) from None
    except Exception as error:  # noqa: BLE001 - damaged files: RuntimeError, EOFError, ...
        raise SourceError(
            f"{path}: not a readable PyTorch checkpoint ({first_line(error)})"
        ) from None
    return _tensors_to_numpy(checkpoint)


def _refusal_reason(error: pickle.UnpicklingError) -> str:
    """The line of torch's long message that says what it refused (`GLOBAL posix.system`, or
    `Unsupported operand 102` for bytes that are no pickle)."""
    reasons = [
        line.rpartition("error:")[2].strip()
        for line in str(error).splitlines()
        if "GLOBAL" in line or "Unsupported" in line
    ]
    return reasons[0].split(". ")[0].rstrip(".") if reasons else first_line(error)


def _tensors_to_numpy(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return (value.float() if value.is_floating_point() else value).numpy()
    if isinstance(value, Mapping):
        return {k: _tensors_to_numpy(v) for k, v in value.items()}
    return value


def unwrap(checkpoint: Mapping[str, Any], path: Path, *, ema: bool = False) -> Mapping[str, Any]:
    """The state dict inside a training checkpoint (`state_dict`, `state_dict_ema`, `model`)."""
    if not isinstance(checkpoint, Mapping):
        raise SourceError(f"{path}: holds a {type(checkpoint).__name__}, not a state dict")
    if ema:
        for key in ("state_dict_ema", "model_ema"):
            if isinstance(checkpoint.get(key), Mapping):
                return checkpoint[key]
        raise SourceError(
            f"{path}: --ema given but there is no state_dict_ema / model_ema "
            f"(top-level keys: {', '.join(list(checkpoint)[:8])})"
        )
    for key in ("state_dict", "model"):
        if isinstance(checkpoint.get(key), Mapping):
            return checkpoint[key]
    return checkpoint


def normalise_keys(state_dict: Mapping[str, Any], path: Path) -> StateDict:
    """Strip DDP / torch.compile prefixes and map Cadene names onto timm's."""
    normalised: StateDict = {}
    for key, value in state_dict.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        for old, new in _RENAMES.items():
            if key.startswith(old):
                key = new + key.removeprefix(old)
        if not isinstance(value, np.ndarray):
            raise SourceError(f"{path}: entry {key} is a {type(value).__name__}, not a tensor")
        normalised[key] = value
    return normalised


def sha256_of(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()
