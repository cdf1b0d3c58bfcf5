"""The engine interface the agent drives, and how one is opened.

Real engines (PyTorch bundle, ONNX Runtime, TensorRT) are opened by an `EngineOpener` the caller hands in (the
`mae-ad run` command passes `trt.backends.open_backend`): the agent imports nothing of the compile stage, so
`import agent` never loads torch. `BrightnessBackend` is a tiny numpy engine for tests, the demo without a model
and the benchmark's overhead baseline: its anomaly map is |grey - median grey|, so a bright scratch or a dark spot
on the grey synthetic product really scores high.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from mae_ad.contract import SCHEMA_VERSION, ArtefactMeta, InputSpec, Prediction, UserError

from .config import ModelSection

log = logging.getLogger(__name__)


@runtime_checkable
class Backend(Protocol):
    """What the agent needs of an engine.

    infer(images float32 [B, 3, S, S], RGB in [0, 1]) -> Prediction(maps float32 [B, 1, S, S], scores float32 [B]).
    meta is the model's typed record (`mae_ad.contract.ArtefactMeta`): model_id, threshold (float or None),
    input {size, mean, std, resize} and the scoring rule.
    """

    name: str
    input_size: int
    max_batch: int | None
    meta: ArtefactMeta

    def infer(self, images: np.ndarray) -> Prediction: ...

    def close(self) -> None: ...

    def __enter__(self) -> Backend: ...

    def __exit__(self, *exc: object) -> None: ...


class EngineOpener(Protocol):
    """Opens a real engine: `trt.backends.open_backend` has this signature (kind: torch | onnxruntime | tensorrt)."""

    def __call__(self, kind: str, path: str | Path, *, threads: int | None = None, max_batch: int | None = None,
                 device: str | None = None) -> Backend: ...


class BrightnessBackend:
    """A numpy engine: map = |grey - median grey of the frame|; score = max of the map.

    On the synthetic product (a brushed grey tile) normal frames score about 0.1, a scratch (near white), a spot or a
    crack (near black) above 0.2. Default threshold 0.17.
    """

    name = "brightness"

    def __init__(self, input_size: int = 64, threshold: float | None = 0.17, max_batch: int | None = None,
                 delay_s: float = 0.0):
        self.input_size = input_size
        self.max_batch = max_batch
        self.delay_s = delay_s  # simulated engine time per batch (tests of pacing)
        self.meta = ArtefactMeta(format_version=SCHEMA_VERSION, kind="brightness", model_id=f"brightness-{input_size}",
                                 threshold=threshold,
                                 input=InputSpec(size=input_size, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0]))
        self.calls = 0

    def infer(self, images: np.ndarray) -> Prediction:
        if images.ndim != 4 or images.shape[1:] != (3, self.input_size, self.input_size):
            raise ValueError(f"expected [B, 3, {self.input_size}, {self.input_size}], got {list(images.shape)}")
        if self.delay_s:
            import time

            time.sleep(self.delay_s)
        self.calls += 1
        g = images.astype(np.float32).mean(axis=1, keepdims=True)  # [B, 1, S, S]
        med = np.median(g.reshape(g.shape[0], -1), axis=1).reshape(-1, 1, 1, 1)
        m = np.abs(g - med).astype(np.float32)
        return Prediction(m, m.reshape(m.shape[0], -1).max(axis=1).astype(np.float32))

    def close(self) -> None:
        pass

    def __enter__(self) -> BrightnessBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_backend(cfg: ModelSection, engines: EngineOpener | None = None) -> Backend:
    """Open the configured engine: the brightness engine here, a real one through `engines`."""
    if cfg.backend == "brightness":
        return BrightnessBackend(cfg.input_size, threshold=cfg.threshold if cfg.threshold is not None else 0.17,
                                 max_batch=cfg.max_batch)
    if engines is None:
        raise UserError(f"model.backend={cfg.backend}: this agent was given no engine runtime to open it with "
                        "(start it with `mae-ad run`, or pass engines=trt.backends.open_backend)")
    assert cfg.path is not None  # the config requires it for real engines
    backend = engines(cfg.backend, cfg.path, threads=cfg.threads, max_batch=cfg.max_batch, device=cfg.device)
    check_backend(backend, cfg)
    return backend


def check_backend(backend: Any, cfg: ModelSection) -> None:
    """Fail loudly (UserError naming the model path) if an engine does not honour the protocol."""
    missing = [a for a in ("name", "input_size", "max_batch", "meta", "infer", "close") if not hasattr(backend, a)]
    if missing:
        raise UserError(f"model.path={cfg.path}: backend {cfg.backend} lacks {', '.join(missing)}")
    meta = backend.meta
    if not isinstance(meta, ArtefactMeta) or not meta.model_id:
        raise UserError(f"model.path={cfg.path}: backend metadata has no model_id")
    size = int(backend.input_size)
    if size < 8:
        raise UserError(f"model.path={cfg.path}: implausible input size {size}")


def model_threshold(backend: Backend) -> float | None:
    t = backend.meta.threshold
    return float(t) if t is not None else None
