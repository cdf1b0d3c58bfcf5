"""The compile stage: merge LoRA into plain weights, export the scoring graph to ONNX, build and run TensorRT engines.

Nothing heavy is imported here. `trt.runtime` and `trt.backends` (for ONNX Runtime and TensorRT) import no torch:
on a Jetson they run with TensorRT and pycuda alone. torch-based modules (`trt.merge`, `trt.export`) are imported
by the CLI inside each command.
"""

__all__ = ["artifacts", "opcheck", "build", "runtime", "backends"]
