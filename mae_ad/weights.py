"""Reading a weights file: `.safetensors`, or a torch file loaded weights-only (no pickle), `model` / `state_dict`
unwrapped and a DDP `module.` prefix dropped. A leaf module (no model import), so both the pretrained-weights
loader (checkpoint.py) and the feature backbone (backbone.py) read files through it.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .contract import UserError


def read_weights_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A flat state dict from the file `path`; UserError naming the file when it cannot be read as one."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: pretrained weights file not found (model.pretrained)")
    if p.suffix == ".safetensors":
        try:
            state = load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{p}: cannot read safetensors weights ({e})") from None
    else:
        try:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{p}: cannot read as a weights-only torch checkpoint ({first})") from None
        for key in ("model", "state_dict"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{p}: expected a dict of tensors (optionally under 'model'), got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}
