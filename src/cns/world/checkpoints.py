"""Resumable training checkpoints of the tiny world's models, without pickle.

A checkpoint ``NAME`` in a folder is two files: ``NAME.safetensors`` (every module's state and
the optimizer's tensor state, keyed ``model/<module>/<key>`` and ``optim/<module>/<param>/<key>``)
and ``NAME.json`` (the step and whatever the trainer records, such as the settings a resumed run
must match). Each file is written to a temporary name and renamed into place; the JSON is
written last, so a checkpoint whose JSON exists is complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

__all__ = ["save_checkpoint", "read_checkpoint_info", "load_checkpoint"]


def _param_names(modules: Mapping[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    return {f"{prefix}/{key}": p for prefix, m in modules.items() for key, p in m.named_parameters()}


def save_checkpoint(folder: str | Path, name: str, modules: Mapping[str, torch.nn.Module], optimizer, step: int,
                    extra: Optional[dict[str, Any]] = None) -> None:
    """Write ``modules``' states, ``optimizer``'s tensor state and ``{"step": step, **extra}``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors = {}
    for prefix, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"model/{prefix}/{key}"] = value.detach().contiguous()
    names = {id(p): n for n, p in _param_names(modules).items()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    tensors[f"optim/{names[id(p)]}/{key}"] = value.detach().contiguous()
    (folder / f"{name}.json").unlink(missing_ok=True)  # incomplete until the JSON is back
    tmp = folder / f".{name}.safetensors.tmp"
    save_file(tensors, tmp)
    os.replace(tmp, folder / f"{name}.safetensors")
    tmp = folder / f".{name}.json.tmp"
    tmp.write_text(json.dumps({"step": step, **(extra or {})}))
    os.replace(tmp, folder / f"{name}.json")


def read_checkpoint_info(folder: str | Path, name: str) -> Optional[dict[str, Any]]:
    """The JSON of a complete checkpoint, or None when there is none."""
    folder = Path(folder)
    if not (folder / f"{name}.json").exists() or not (folder / f"{name}.safetensors").exists():
        return None
    return json.loads((folder / f"{name}.json").read_text())


def load_checkpoint(folder: str | Path, name: str, modules: Mapping[str, torch.nn.Module], optimizer) -> int:
    """Restore a checkpoint into ``modules`` and ``optimizer``; returns its step (0: none)."""
    from safetensors.torch import load_file

    info = read_checkpoint_info(folder, name)
    if info is None:
        return 0
    tensors = load_file(Path(folder) / f"{name}.safetensors")
    for prefix, module in modules.items():
        module.load_state_dict({k.split("/", 2)[2]: v for k, v in tensors.items()
                                if k.startswith(f"model/{prefix}/")})
    params = _param_names(modules)
    for key, value in tensors.items():
        if key.startswith("optim/"):
            pname, state_key = key[len("optim/"):].rsplit("/", 1)
            optimizer.state[params[pname]][state_key] = value
    return int(info["step"])
