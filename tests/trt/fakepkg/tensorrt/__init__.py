"""Stand-in for `tensorrt` in subprocess tests: replaced by the recording fake of $MAE_AD_FAKE_TRT (e.g. 10.3)."""
import sys

from tests.trt.fakes import shared_gpu

sys.modules[__name__] = shared_gpu().trt
