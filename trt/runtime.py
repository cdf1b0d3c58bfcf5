"""Run a TensorRT engine with pycuda: no torch, only TensorRT, pycuda and numpy.

Sequence (TensorRT 10.x and 11.x name-based I/O; binding indices are never used):
  deserialize_cuda_engine -> create_execution_context -> for each I/O tensor found by name and TensorIOMode,
  pinned host (pagelocked_empty) and device (mem_alloc) buffers sized for the profile's maximum batch ->
  set_tensor_address once -> per batch: memcpy_htod_async, set_input_shape, execute_async_v3(stream.handle),
  memcpy_dtoh_async, stream.synchronize.

The engine's sidecar (`model.plan.meta.json`) records the TensorRT version and the GPU it was built with; an engine
from another TensorRT version or another GPU is refused with a message to rebuild (plans are not portable).
The CUDA primary context is pushed around every call, so the engine may be used from any one thread at a time;
`close()` (or leaving the `with` block) frees the buffers.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from mae_ad.contract import INPUT_NAME, MAP_NAME, SCORE_NAME, EngineMeta, Prediction, UserError

from .artifacts import PYCUDA_INSTALL_HINT, import_optional, read_sidecar, sidecar_path
from .trtapi import import_tensorrt, make_logger

log = logging.getLogger(__name__)


class BatchTooLarge(UserError):
    """A batch larger than the engine's optimisation profile allows."""


def check_compatible(meta: EngineMeta, trt_version: str, gpu_name: str, compute_capability: str,
                     plan: Path) -> None:
    """Refuse an engine built by another TensorRT version or for another GPU."""
    rebuild = f"rebuild it on this device: mae-ad build-engine {meta.onnx} --out {plan}"
    built = meta.tensorrt_version
    if built != trt_version:
        raise UserError(f"{plan}: engine built with TensorRT {built}, this is TensorRT {trt_version}; "
                        f"engines are not portable, {rebuild}")
    gpu = meta.gpu
    if gpu.compute_capability != compute_capability or gpu.name != gpu_name:
        raise UserError(f"{plan}: engine built for {gpu.name} (compute {gpu.compute_capability}), "
                        f"this GPU is {gpu_name} (compute {compute_capability}); engines are not portable, {rebuild}")


class TensorRTEngine:
    """A deserialised engine with its buffers. Use as a context manager, or call close()."""

    def __init__(self, plan: str | Path, *, device: int = 0, max_batch: int | None = None) -> None:
        self.path = Path(plan)
        self._closed = True
        self._lock = threading.Lock()
        if not self.path.is_file():
            raise UserError(f"{self.path}: engine file not found")
        if not sidecar_path(self.path).is_file():
            raise UserError(f"{sidecar_path(self.path)}: missing; it records the TensorRT version and GPU the engine "
                            "was built for (rebuild with `mae-ad build-engine`)")
        self.meta = read_sidecar(self.path, "engine", EngineMeta)
        trt = import_tensorrt()
        cuda = import_optional("pycuda.driver", PYCUDA_INSTALL_HINT)
        self._trt, self._cuda = trt, cuda
        cuda.init()
        if device >= cuda.Device.count():
            raise UserError(f"device {device}: this machine has {cuda.Device.count()} CUDA device(s)")
        dev = cuda.Device(device)
        cc = "{}.{}".format(*dev.compute_capability())
        check_compatible(self.meta, str(trt.__version__), str(dev.name()), cc, self.path)

        self._ctx = dev.retain_primary_context()
        self._ctx.push()
        self._allocs: list[Any] = []
        try:
            self._logger = make_logger(trt, "tensorrt.runtime")
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self._engine is None:
                raise UserError(f"{self.path}: TensorRT could not deserialize the engine (corrupt, or built by "
                                "another TensorRT version); rebuild it with `mae-ad build-engine`")
            self._context = self._engine.create_execution_context()
            self._setup(trt, cuda, max_batch)
            self._closed = False
        except BaseException:
            self._free()
            type(self._ctx).pop()
            self._ctx.detach()
            raise
        type(self._ctx).pop()

    def _setup(self, trt: Any, cuda: Any, max_batch: int | None) -> None:
        eng, ctx = self._engine, self._context
        modes: dict[str, Any] = {}
        for i in range(eng.num_io_tensors):
            name = eng.get_tensor_name(i)
            modes[name] = eng.get_tensor_mode(name)
        inputs = [n for n, m in modes.items() if m == trt.TensorIOMode.INPUT]
        outputs = [n for n, m in modes.items() if m == trt.TensorIOMode.OUTPUT]
        if inputs != [INPUT_NAME] or set(outputs) != {MAP_NAME, SCORE_NAME}:
            raise UserError(f"{self.path}: engine I/O {inputs} -> {outputs}; expected [{INPUT_NAME!r}] -> "
                            f"[{MAP_NAME!r}, {SCORE_NAME!r}]")
        pmin, _, pmax = (tuple(d) for d in eng.get_tensor_profile_shape(INPUT_NAME, 0))
        self.profile_max = int(pmax[0])
        if max_batch is not None and max_batch > self.profile_max:
            raise BatchTooLarge(f"max_batch={max_batch}: the engine {self.path} was built for batches up to "
                                f"{self.profile_max} (rebuild with --max-batch {max_batch})")
        self.max_batch = max_batch or self.profile_max
        self.input_shape = tuple(int(d) for d in pmax[1:])
        self.input_size = int(pmax[-1])
        if not ctx.set_input_shape(INPUT_NAME, (self.max_batch, *self.input_shape)):
            raise UserError(f"{self.path}: the engine refused input shape {(self.max_batch, *self.input_shape)}")
        self._host: dict[str, np.ndarray] = {}
        self._dev: dict[str, Any] = {}
        self._dtype: dict[str, Any] = {}
        for name in (INPUT_NAME, MAP_NAME, SCORE_NAME):
            shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(eng.get_tensor_dtype(name)))
            host = cuda.pagelocked_empty(int(trt.volume(shape)), dtype)
            dmem = cuda.mem_alloc(host.nbytes)
            self._allocs.append(dmem)
            self._host[name], self._dev[name], self._dtype[name] = host, dmem, dtype
            if not ctx.set_tensor_address(name, int(dmem)):
                raise UserError(f"{self.path}: could not bind tensor {name!r}")
        self._stream = cuda.Stream()

    def infer(self, images: np.ndarray) -> Prediction:
        """images float32 [B, 3, S, S] RGB in [0, 1] -> Prediction(maps float32 [B, 1, S, S], scores float32 [B])."""
        if self._closed:
            raise RuntimeError(f"{self.path}: engine is closed")
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != self.input_shape:
            raise ValueError(f"expected images [B, {', '.join(map(str, self.input_shape))}], got {images.shape}")
        b = images.shape[0]
        if not 1 <= b <= self.max_batch:
            raise BatchTooLarge(f"batch of {b} images: the engine {self.path} takes 1..{self.max_batch} "
                                "(split the batch, or rebuild with a larger --max-batch)")
        cuda, ctx = self._cuda, self._context
        with self._lock:
            self._ctx.push()
            try:
                per = int(np.prod(self.input_shape))
                h_in = self._host[INPUT_NAME][: b * per]
                h_in[:] = images.astype(self._dtype[INPUT_NAME], copy=False).reshape(-1)
                if not ctx.set_input_shape(INPUT_NAME, (b, *self.input_shape)):
                    raise RuntimeError(f"{self.path}: the engine refused batch {b}")
                cuda.memcpy_htod_async(self._dev[INPUT_NAME], h_in, self._stream)
                if not ctx.execute_async_v3(stream_handle=self._stream.handle):
                    raise RuntimeError(f"{self.path}: execute_async_v3 failed (see the TensorRT log)")
                views = {}
                for name in (MAP_NAME, SCORE_NAME):
                    shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
                    n = int(np.prod(shape))
                    views[name] = (self._host[name][:n], shape)
                    cuda.memcpy_dtoh_async(views[name][0], self._dev[name], self._stream)
                self._stream.synchronize()
            finally:
                type(self._ctx).pop()
        maps = views[MAP_NAME][0].reshape(views[MAP_NAME][1]).astype(np.float32, copy=True)
        scores = views[SCORE_NAME][0].reshape(views[SCORE_NAME][1]).astype(np.float32, copy=True)
        return Prediction(maps, scores)

    def _free(self) -> None:
        for a in self._allocs:
            a.free()
        self._allocs = []
        for attr in ("_context", "_engine", "_runtime"):
            if hasattr(self, attr):
                delattr(self, attr)  # TensorRT objects go before the context that owns their memory

    def close(self) -> None:
        if self._closed:
            return
        with self._lock:
            self._closed = True
            self._ctx.push()
            try:
                if hasattr(self, "_stream"):
                    self._stream.synchronize()
                self._free()
            finally:
                type(self._ctx).pop()
                self._ctx.detach()

    def __enter__(self) -> TensorRTEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
