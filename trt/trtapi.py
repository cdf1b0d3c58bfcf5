"""The few TensorRT helpers both the engine builder (trt.build) and the runtime (trt.runtime) need: the lazy import
with a message saying what to install, the major version, and an ILogger that forwards to Python logging.
No torch, and TensorRT only when called.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

from .artifacts import TRT_INSTALL_HINT, import_optional

_SEVERITY_TO_LEVEL = {"INTERNAL_ERROR": logging.CRITICAL, "ERROR": logging.ERROR, "WARNING": logging.WARNING,
                      "INFO": logging.INFO, "VERBOSE": logging.DEBUG}


def import_tensorrt() -> ModuleType:
    return import_optional("tensorrt", TRT_INSTALL_HINT)


def trt_major(trt: ModuleType) -> int:
    return int(str(trt.__version__).split(".")[0])


def make_logger(trt: ModuleType, name: str = "tensorrt") -> Any:
    """A TensorRT ILogger that forwards to Python logging (the subclass must call ILogger.__init__)."""
    pylog = logging.getLogger(name)

    class _Logger(trt.ILogger):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            pylog.log(_SEVERITY_TO_LEVEL.get(getattr(severity, "name", ""), logging.INFO), "%s", msg)

    return _Logger()
