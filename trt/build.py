"""`mae-ad build-engine`: build a TensorRT engine (a plan) from the exported ONNX, on the device that will run it.

Written against the TensorRT 10.x (10.3 on JetPack 6 up to 10.16) and 11.x Python APIs:
- network: explicit batch is the only mode in 10.x and 11.x (`create_network(0)`); an FP16 ONNX is built as a
  strongly typed network (`1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)` on 10.x; 11.x networks are
  always strongly typed and the flag is deprecated, so nothing is passed);
- precision: FP16 through `BuilderFlag.FP16` on 10.x with an FP32 ONNX; on 11.x that flag is gone and FP16 comes
  from the FP16 ONNX (`mae-ad export --fp16`);
- workspace through `set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes)`;
- one optimisation profile for the input, batch 1..N;
- a timing cache file read before and written after each build;
- parser errors reported one per line (ParserError's fields are methods).
No torch is imported. TensorRT is imported lazily with a message saying what to install.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

from mae_ad.contract import (
    INPUT_NAME,
    KIND_PLAN,
    MAP_NAME,
    SCHEMA_VERSION,
    SCORE_NAME,
    EngineMeta,
    GpuInfo,
    ParentRef,
    Precision,
    UserError,
    dump_meta,
    sha256_file,
    write_json_atomic,
)

from .artifacts import (
    PYCUDA_INSTALL_HINT,
    import_optional,
    read_onnx_meta,
    refuse_existing,
    sidecar_path,
    write_bytes_atomic,
)
from .opcheck import load_onnx
from .trtapi import import_tensorrt, make_logger, trt_major

log = logging.getLogger(__name__)

def gpu_info(device: int = 0) -> dict[str, Any]:
    """Name and compute capability of a CUDA device, through pycuda (no context is created)."""
    cuda = import_optional("pycuda.driver", PYCUDA_INSTALL_HINT)
    cuda.init()
    if device >= cuda.Device.count():
        raise UserError(f"--device {device}: this machine has {cuda.Device.count()} CUDA device(s)")
    dev = cuda.Device(device)
    major, minor = dev.compute_capability()
    return {"name": str(dev.name()), "compute_capability": f"{major}.{minor}", "index": device}


def parser_error_lines(parser: Any) -> list[str]:
    lines = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        where = f"node {e.node()}" + (f" {e.node_name()!r}" if e.node_name() else "")
        op = f" ({e.node_operator()})" if e.node_operator() else ""
        lines.append(f"{where}{op}: {e.desc()} [{e.code().name}]")
    return lines


def build_engine(
    onnx_path: str | Path, out: str | Path, *, fp16: bool = False, workspace_mb: int = 1024,
    max_batch: int | None = None, opt_batch: int | None = None, timing_cache: str | Path | None = None,
    device: int = 0,
) -> Path:
    """Build `out` (a serialized engine) and `out.meta.json` from `onnx_path`. Returns `out`."""
    onnx_path, out = Path(onnx_path), Path(out)
    proto = load_onnx(onnx_path)  # missing or corrupt ONNX: a clear error before TensorRT is touched
    ometa = read_onnx_meta(onnx_path, lambda: {p.key: p.value for p in proto.metadata_props})
    if workspace_mb < 1:
        raise UserError(f"--workspace-mb {workspace_mb}: must be at least 1")
    n_max = max_batch or ometa.max_batch_hint or 8
    n_opt = opt_batch or n_max
    if not 1 <= n_opt <= n_max:
        raise UserError(f"--opt-batch {n_opt}: must lie in 1..--max-batch ({n_max})")
    refuse_existing(out, sidecar_path(out), what="engine")
    onnx_fp16 = ometa.precision == "fp16"

    trt = import_tensorrt()
    major = trt_major(trt)
    if major < 10:
        raise UserError(f"TensorRT {trt.__version__} is too old: this project needs TensorRT 10 or newer")
    if fp16 and major >= 11 and not onnx_fp16:
        raise UserError(f"{onnx_path}: TensorRT {trt.__version__} has no FP16 builder flag (networks are strongly "
                        "typed): export an FP16 model with `mae-ad export --fp16` and build that")
    gpu = gpu_info(device)

    logger = make_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if onnx_fp16 and major == 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file, so external weights are found beside it
        lines = parser_error_lines(parser)
        for line in lines:
            log.error("ONNX parser: %s", line)
        raise UserError(f"{onnx_path}: TensorRT's ONNX parser failed with {len(lines)} error(s) (listed above)")

    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    outputs = {network.get_output(i).name for i in range(network.num_outputs)}
    if INPUT_NAME not in inputs or not {MAP_NAME, SCORE_NAME} <= outputs:
        raise UserError(f"{onnx_path}: expected input {INPUT_NAME!r} and outputs {MAP_NAME!r}, {SCORE_NAME!r}; "
                        f"found {sorted(inputs)} -> {sorted(outputs)}")
    shape = tuple(inputs[INPUT_NAME].shape)
    if len(shape) != 4 or any(d < 1 for d in shape[1:]):
        raise UserError(f"{onnx_path}: input {INPUT_NAME!r} has shape {shape}; expected [batch, 3, H, W]")
    c, h, w = shape[1:]

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    precision: Precision = "fp16" if (fp16 or onnx_fp16) else "fp32"
    if fp16 and major == 10 and not onnx_fp16:
        if not builder.platform_has_fast_fp16:
            log.warning("this GPU has no fast FP16; building FP16 anyway")
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    pmin, popt, pmax = (1, c, h, w), (n_opt, c, h, w), (n_max, c, h, w)
    profile.set_shape(INPUT_NAME, pmin, popt, pmax)
    if config.add_optimization_profile(profile) < 0:
        raise UserError(f"{onnx_path}: TensorRT rejected the optimisation profile {pmin}..{pmax}")

    cache_path = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, False):
        log.warning("timing cache %s does not match this TensorRT/GPU; starting a new one", cache_path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, True)

    log.info("building %s engine for %s (batch %d..%d, opt %d, workspace %d MB) with TensorRT %s",
             precision, gpu["name"], 1, n_max, n_opt, workspace_mb, trt.__version__)
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(f"{onnx_path}: TensorRT could not build the engine (see its log above)")
    build_s = time.perf_counter() - t0
    data = bytes(memoryview(plan))
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))

    onnx_sha = sha256_file(onnx_path)
    meta = EngineMeta(
        format_version=SCHEMA_VERSION,
        kind=KIND_PLAN,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        tensorrt_version=str(trt.__version__),
        gpu=GpuInfo.model_validate(gpu),
        onnx=str(onnx_path),
        onnx_sha256=onnx_sha,
        precision=precision,
        strongly_typed=bool(onnx_fp16 or major >= 11),
        profile={"input": INPUT_NAME, "min": list(pmin), "opt": list(popt), "max": list(pmax)},
        max_batch=n_max,
        workspace_mb=workspace_mb,
        build_seconds=round(build_s, 2),
        plan_sha256=hashlib.sha256(data).hexdigest(),
        # what the runtime needs without the ONNX
        model_id=ometa.model_id,
        threshold=ometa.threshold,
        input=ometa.input,
        scoring=ometa.scoring,
        parent=ParentRef(onnx_sha256=onnx_sha, bundle_sha256=ometa.parent.bundle_sha256 if ometa.parent else None),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(sidecar_path(out), dump_meta(meta))  # the sidecar first: a plan is never seen without it
    try:
        write_bytes_atomic(out, data)
    except BaseException:
        sidecar_path(out).unlink(missing_ok=True)
        raise
    log.info("wrote %s (%.1f MB, built in %.0f s)", out, len(data) / 1e6, build_s)
    return out
