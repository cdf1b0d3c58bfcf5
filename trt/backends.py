"""One interface for three engines, so the agent chooses by config: PyTorch (bundle dir), ONNX Runtime (.onnx),
TensorRT (.plan).

    with open_backend("onnxruntime", "model.onnx", threads=2) as be:
        maps, scores = be.infer(images)  # float32 [B, 3, S, S] RGB in [0, 1] -> Prediction([B, 1, S, S], [B])

Every backend has `name`, `path`, `input_size` (S), `max_batch` (None = no limit), `meta` (the artefact's typed
record, `mae_ad.contract.ArtefactMeta`: model_id, threshold, input {size, mean, std, resize}, scoring, precision,
kind), `infer` (returns a `mae_ad.contract.Prediction`), `close` and works as a context manager: the agent's
`agent.backend.Backend` protocol. A batch larger than `max_batch` raises `BatchTooLarge` (a UserError): the caller
splits batches. The onnxruntime and tensorrt backends import no torch; the torch backend imports `mae_ad.bundle`
when opened.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from mae_ad.contract import INPUT_NAME, MAP_NAME, SCORE_NAME, ArtefactMeta, Prediction, UserError

from .artifacts import ORT_INSTALL_HINT, import_optional, read_onnx_meta
from .runtime import BatchTooLarge

log = logging.getLogger(__name__)

KINDS = ("torch", "onnxruntime", "tensorrt")


class BaseBackend:
    """Base class of the engines here: validation of inputs and the context-manager protocol."""

    name: str = "backend"
    path: Path
    input_size: int
    max_batch: int | None
    meta: ArtefactMeta

    def _check(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        s = self.input_size
        if images.ndim != 4 or images.shape[1:] != (3, s, s):
            raise ValueError(f"{self.name}: expected images [B, 3, {s}, {s}], got {tuple(images.shape)}")
        b = images.shape[0]
        if b < 1:
            raise ValueError(f"{self.name}: empty batch")
        if self.max_batch is not None and b > self.max_batch:
            raise BatchTooLarge(f"batch of {b} images: the {self.name} backend takes at most {self.max_batch} "
                                "(split the batch)")
        return np.ascontiguousarray(images, dtype=np.float32)

    def infer(self, images: np.ndarray) -> Prediction:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> BaseBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path} size={self.input_size} max_batch={self.max_batch}>"


class TorchBackend(BaseBackend):
    name = "torch"

    def __init__(self, bundle: Path, *, threads: int | None, max_batch: int | None, device: str | None) -> None:
        import torch

        from mae_ad.bundle import load_scorer

        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self._device = device or "cpu"
        self.path = bundle
        self.scorer, cal, bmeta = load_scorer(bundle, self._device)
        self.input_size = int(self.scorer.img_size)
        self.max_batch = max_batch
        self.meta = bmeta.model_copy(update={"threshold": None if cal is None else float(cal["threshold"]),
                                             "precision": "fp32"})

    def infer(self, images: np.ndarray) -> Prediction:
        x = self._torch.from_numpy(self._check(images)).to(self._device)
        with self._torch.inference_mode():
            maps, scores = self.scorer(x)
        return Prediction(maps.float().cpu().numpy(), scores.float().cpu().numpy())

    def close(self) -> None:
        self.scorer = None  # type: ignore[assignment]


def ort_session_options(ort: Any, threads: int | None) -> Any:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


class OnnxRuntimeBackend(BaseBackend):
    name = "onnxruntime"

    def __init__(self, path: Path, *, threads: int | None, max_batch: int | None, device: str | None) -> None:
        ort = import_optional("onnxruntime", ORT_INSTALL_HINT)
        if not path.is_file():
            raise UserError(f"{path}: ONNX file not found")
        providers = ["CPUExecutionProvider"]
        if device and device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise UserError(f"device {device!r}: this onnxruntime has no CUDA provider (pip install onnxruntime-gpu)")
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), ort_session_options(ort, threads), providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise UserError(f"{path}: onnxruntime cannot load the model ({str(e).splitlines()[0][:200]})") from None
        self.path = path
        self.meta = read_onnx_meta(path, lambda: dict(self.session.get_modelmeta().custom_metadata_map))
        names_in = [i.name for i in self.session.get_inputs()]
        names_out = {o.name for o in self.session.get_outputs()}
        if names_in != [INPUT_NAME] or not {MAP_NAME, SCORE_NAME} <= names_out:
            raise UserError(f"{path}: graph I/O {names_in} -> {sorted(names_out)} is not a mae-ad scoring graph")
        self.input_size = self.meta.input.size
        self.max_batch = max_batch

    def infer(self, images: np.ndarray) -> Prediction:
        maps, scores = self.session.run([MAP_NAME, SCORE_NAME], {INPUT_NAME: self._check(images)})
        return Prediction(maps.astype(np.float32, copy=False), scores.astype(np.float32, copy=False))

    def close(self) -> None:
        self.session = None


class TensorRTBackend(BaseBackend):
    name = "tensorrt"

    def __init__(self, path: Path, *, threads: int | None, max_batch: int | None, device: str | None) -> None:
        from .runtime import TensorRTEngine

        index = 0
        if device:
            try:
                index = int(device.split(":")[-1]) if device not in ("cuda", "gpu") else 0
            except ValueError:
                raise UserError(f"device {device!r}: expected cuda or cuda:N for the tensorrt backend") from None
        self.path = path
        self.engine = TensorRTEngine(path, device=index, max_batch=max_batch)
        self.meta = self.engine.meta
        self.input_size = self.engine.input_size
        self.max_batch = self.engine.max_batch

    def infer(self, images: np.ndarray) -> Prediction:
        return self.engine.infer(self._check(images))

    def close(self) -> None:
        self.engine.close()


def open_backend(kind: str, path: str | Path, *, threads: int | None = None, max_batch: int | None = None,
                 device: str | None = None) -> BaseBackend:
    """Open a scoring backend: "torch" (bundle directory), "onnxruntime" (.onnx) or "tensorrt" (.plan)."""
    p = Path(path)
    if max_batch is not None and max_batch < 1:
        raise UserError(f"max_batch={max_batch}: must be at least 1")
    if threads is not None and threads < 1:
        raise UserError(f"threads={threads}: must be at least 1")
    if kind == "torch":
        return TorchBackend(p, threads=threads, max_batch=max_batch, device=device)
    if kind == "onnxruntime":
        return OnnxRuntimeBackend(p, threads=threads, max_batch=max_batch, device=device)
    if kind == "tensorrt":
        return TensorRTBackend(p, threads=threads, max_batch=max_batch, device=device)
    raise UserError(f"backend {kind!r}: choose one of {', '.join(KINDS)}")
