"""Settings that travel with a base model: ``cns_settings.json`` beside ``model_index.json``.

A model folder may recommend how cns should learn on it (learning rates, steps, prior
images...) and which calibration prompts (Eq. 5) describe its generic prompts. ``cns init``
records both in the new library, so that ``cns learn`` without flags uses them; flags still
override any of them. A model without the file (SD-1.5, SDXL...) gets :class:`LearnConfig`'s
defaults, which follow the paper.

Names of shipped models: ``tiny-world`` is the tiny world's pretrained model in the package.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import LearnConfig
from .errors import CNSError

__all__ = ["SETTINGS_FILE", "resolve_model", "read_model_settings", "BEYOND_PAPER", "METHOD_PRESETS",
           "learn_settings"]

SETTINGS_FILE = "cns_settings.json"

# LearnConfig settings beyond the paper, which a model's cns_settings.json may recommend.
BEYOND_PAPER = ("lambda_keep", "lambda_generic", "generic_padding", "lambda_lock", "lambda_refit")

# Learning settings that turn the method into the paper's CNS (Eq. 7-8 only), whatever the
# model recommends beyond the paper: every setting beyond it back at LearnConfig's default (off).
METHOD_PRESETS: dict[str, dict] = {
    "paper": {**{k: getattr(LearnConfig(), k) for k in BEYOND_PAPER}, "regularize": True, "neurons": "concept"},
}


def learn_settings(defaults, method: str | None = None, overrides: dict | None = None):
    """The settings ``learn`` runs with: ``defaults`` (a library's, i.e. the base model's
    recommended ones), then a named method (``"paper"``: :data:`METHOD_PRESETS`), then
    ``overrides`` (LearnConfig fields, e.g. the flags a user gave). Returns a new LearnConfig."""
    from dataclasses import replace

    if method not in (None, "default") and method not in METHOD_PRESETS:
        raise CNSError(f"unknown method {method!r}: default or {', '.join(METHOD_PRESETS)}")
    return replace(defaults, **{**METHOD_PRESETS.get(method or "", {}), **(overrides or {})})


def shipped_models() -> dict[str, Path]:
    """Names of the models that ship with cns -> their folders."""
    from .world.pretrain import DEFAULT_MODEL_PATH

    return {"tiny-world": DEFAULT_MODEL_PATH}


def resolve_model(model: str) -> str:
    """A shipped model's name -> its folder; anything else (a folder, a hub id) unchanged. An
    existing local path of the same name wins over a shipped name."""
    if not Path(model).expanduser().exists() and model in shipped_models():
        return str(shipped_models()[model])
    return model


def read_model_settings(model: str) -> dict:
    """``{'learn': {...LearnConfig settings}, 'calibration_prompts': [...]}`` from the model
    folder's ``cns_settings.json`` (either key may be missing); ``{}`` for a model without one
    (or a hub id). Unknown learn settings are refused, so that a typo does not pass unseen."""
    path = Path(model).expanduser() / SETTINGS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CNSError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise CNSError(f"{path} must hold a JSON object")
    learn = data.get("learn", {})
    known = set(LearnConfig().to_dict())
    unknown = sorted(set(learn) - known) if isinstance(learn, dict) else ["(not an object)"]
    if unknown:
        raise CNSError(f"{path}: unknown learn settings {', '.join(unknown)}")
    try:
        LearnConfig.from_dict(learn).validate()
    except CNSError as exc:
        raise CNSError(f"{path}: {exc}") from None
    prompts = data.get("calibration_prompts")
    if prompts is not None and (not isinstance(prompts, list) or not all(isinstance(p, str) and p for p in prompts)):
        raise CNSError(f"{path}: calibration_prompts must be a list of prompts")
    return {k: v for k, v in (("learn", learn), ("calibration_prompts", prompts)) if v}
