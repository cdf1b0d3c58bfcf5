"""How the agent gets real engines: the compile stage's backends handed to it as its `EngineOpener`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.backend import Backend


def open_engine(kind: str, path: str | Path, *, threads: int | None = None, max_batch: int | None = None,
                device: str | None = None) -> Backend:
    """`agent.backend.EngineOpener` over `trt.backends.open_backend`, imported when a real engine is opened (the
    onnxruntime and tensorrt backends load no torch; the torch backend loads it when opened)."""
    from mae_ad.contract import UserError

    try:
        from trt.backends import open_backend
    except ModuleNotFoundError as e:
        raise UserError(f"model.backend={kind}: the engine runtime (trt.backends) cannot be imported ({e})") from None
    return open_backend(kind, path, threads=threads, max_batch=max_batch, device=device)
