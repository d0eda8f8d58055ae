"""Reading DPN weights from what users have: safetensors, PyTorch checkpoints, Hugging Face hub repos.

Every reader returns a flat timm-named state dict of numpy arrays. PyTorch files are read with
`torch.load(weights_only=True)`, whose restricted unpickler refuses any global that is not a
tensor type, so a checkpoint cannot run code; safetensors cannot carry code at all.
"""
from __future__ import annotations

import argparse
import hashlib
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

StateDict = dict[str, np.ndarray]

SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".tar", ".ckpt")
HUB_PREFIX = "hf-hub:"
HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")  # preferred first, as timm
_HUB_REPO = re.compile(r"[\w.-]+/[\w.-]+")
# Wrapper prefixes of DDP and torch.compile, in any order (timm's `clean_state_dict`).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Cadene `pretrainedmodels` DPNs call the classifier `last_linear`; otherwise timm's names.
_RENAMES = {"last_linear.": "classifier."}


class SourceError(ValueError):
    """A weights source that cannot be read; the message is one line naming the source."""


@dataclass(frozen=True)
class Source:
    """A local checkpoint file and where it came from."""
    path: Path
    name: str  # as the user gave it (hub sources: `hf-hub:owner/repo/filename`)
    hub_repo: str | None = None


def resolve_source(src: str) -> Source:
    """A local file, or `owner/repo` / `hf-hub:owner/repo` fetched into the Hugging Face cache."""
    path = Path(src).expanduser()
    if not src.startswith(HUB_PREFIX) and path.exists():
        if path.is_dir():
            hint = (" (a dpn_jax model directory: export it with --to-torch)"
                    if (path / "metadata.json").exists() else "")
            raise SourceError(f"{src} is a directory, not a checkpoint file{hint}")
        return Source(path, src)
    repo = src.removeprefix(HUB_PREFIX)
    if src.startswith(HUB_PREFIX) or _HUB_REPO.fullmatch(repo):
        return download_from_hub(repo)
    raise SourceError(f"{src}: no such file")


def download_from_hub(repo: str) -> Source:
    """`model.safetensors` (else `pytorch_model.bin`) of a hub repo, through huggingface_hub's cache.

    huggingface_hub honours `HF_HUB_OFFLINE` / `HF_HOME` / `HF_HUB_CACHE`: offline, a cached
    file is used and nothing else is tried.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    for filename in HUB_FILENAMES:
        try:
            path = hf_hub_download(repo, filename)
        except (EntryNotFoundError, LocalEntryNotFoundError):
            continue
        except RepositoryNotFoundError:
            raise SourceError(f"hub repository {repo} not found (or private / gated)") from None
        return Source(Path(path), f"{HUB_PREFIX}{repo}/{filename}", hub_repo=repo)
    raise SourceError(f"hub repository {repo}: none of {', '.join(HUB_FILENAMES)} could be downloaded "
                      "or found in the local Hugging Face cache (offline: HF_HUB_OFFLINE=1?)")


def read_state_dict(path: Path, *, ema: bool = False) -> StateDict:
    """The timm-named state dict in a checkpoint file, unwrapped and with wrapper prefixes removed."""
    if path.stat().st_size == 0:
        raise SourceError(f"{path}: file is empty")
    name = path.name.lower()
    if name.endswith(SAFETENSORS_SUFFIX):
        checkpoint: Mapping[str, Any] = _read_safetensors(path)
    elif name.endswith(TORCH_SUFFIXES):
        checkpoint = _read_torch(path)
    else:
        raise SourceError(f"{path}: unknown checkpoint type; expected {SAFETENSORS_SUFFIX} or one of "
                          f"{', '.join(TORCH_SUFFIXES)}")
    return normalise_keys(unwrap(checkpoint, path, ema=ema), path)


def _read_safetensors(path: Path) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (SafetensorError, ValueError, TypeError) as error:
        raise SourceError(f"{path}: not a valid safetensors file ({_first_line(error)})") from None


def _read_torch(path: Path) -> Any:
    try:
        import torch
    except ImportError:
        raise SourceError(f"{path}: reading PyTorch checkpoints needs torch "
                          "(pip install 'dpn_jax[torch]'), or convert the file to .safetensors") from None
    try:
        # timm training checkpoints keep their argparse.Namespace `args`; timm allows it the same way.
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _refusal_reason(error)
        if "GLOBAL" not in reason:  # damaged or not a pickle at all
            raise SourceError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
        raise SourceError(f"{path}: refused by torch's weights-only unpickler ({reason}); "
                          "nothing in it was run (prefer .safetensors)") from None
    except Exception as error:  # torch raises RuntimeError, EOFError, ... for damaged files
        raise SourceError(f"{path}: not a readable PyTorch checkpoint ({_first_line(error)})") from None
    return _tensors_to_numpy(checkpoint)


def _refusal_reason(error: pickle.UnpicklingError) -> str:
    """The line of torch's long message that says what it refused (`GLOBAL posix.system`, or
    `Unsupported operand 102` for bytes that are no pickle)."""
    reasons = [line.rpartition("error:")[2].strip() for line in str(error).splitlines()
               if "GLOBAL" in line or "Unsupported" in line]
    return reasons[0].split(". ")[0].rstrip(".") if reasons else _first_line(error)


def _tensors_to_numpy(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return (value.float() if value.is_floating_point() else value).numpy()
    if isinstance(value, Mapping):
        return {k: _tensors_to_numpy(v) for k, v in value.items()}
    return value


def unwrap(checkpoint: Mapping[str, Any], path: Path, *, ema: bool = False) -> Mapping[str, Any]:
    """The state dict inside a training checkpoint (timm's `state_dict` / `state_dict_ema` / `model`)."""
    if not isinstance(checkpoint, Mapping):
        raise SourceError(f"{path}: holds a {type(checkpoint).__name__}, not a state dict")
    if ema:
        for key in ("state_dict_ema", "model_ema"):
            if isinstance(checkpoint.get(key), Mapping):
                return checkpoint[key]
        raise SourceError(f"{path}: --ema given but there is no state_dict_ema / model_ema "
                          f"(top-level keys: {', '.join(list(checkpoint)[:8])})")
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


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
