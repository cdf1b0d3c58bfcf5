"""The compile stage: merge LoRA into plain weights, export the scoring graph to ONNX, build and run TensorRT engines.

Nothing heavy is imported here. `trt.runtime` and `trt.backends` (for ONNX Runtime and TensorRT) import no torch:
on a Jetson they run with TensorRT and pycuda alone. torch-based modules (`trt.merge`, `trt.export`) are imported
by the CLI (app/cli_compile.py) inside each command. `trt.trtapi` holds the TensorRT helpers the builder and
the runtime share, so backends -> runtime -> build does not loop back.
"""

__all__ = ["artifacts", "opcheck", "trtapi", "build", "runtime", "backends"]
