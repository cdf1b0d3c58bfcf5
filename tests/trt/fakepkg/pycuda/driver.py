"""Stand-in for `pycuda.driver` in subprocess tests: the fake sharing memory with the fake tensorrt."""
import sys

from tests.trt.fakes import shared_gpu

sys.modules[__name__] = shared_gpu().cuda.module
