"""Stand-in for `pycuda` in subprocess tests (see tests/trt/fakes.py)."""
