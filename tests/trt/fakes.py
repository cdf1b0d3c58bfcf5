"""Recording fakes of `tensorrt` (10.3, 10.16, 11.4) and `pycuda.driver`, built from the real API surfaces.

Names come from `surfaces/surface-<version>.txt.gz` (live introspection of the real binding modules, see
/work/shared/reference/tensorrt/): an attribute absent from a version's surface raises AttributeError, exactly as
the real module would (e.g. `BuilderFlag.FP16` or `Builder.platform_has_fast_fp16` on 11.x), and every public
attribute touched is recorded as "Class.member" so a test can check it against the surface. Enum values come from
the surface too (BuilderFlag shifts in 11.x). pybind11 behaviour is copied where code can trip on it: enums are not
ints (`1 << flag` and `flag | flag` raise TypeError, `flag == 0` is False), classes without constructors raise
TypeError, an ILogger subclass must call `ILogger.__init__`, ParserError fields are methods, IHostMemory supports
the buffer protocol, `deserialize_cuda_engine` returns None for a foreign plan.

The fake engine really computes: the "plan" names the ONNX it was built from, and `execute_async_v3` reads the
input from fake device memory, runs that ONNX with ONNX Runtime and writes the outputs back, so the runtime's
buffer handling (pinned host views, addresses, shapes, copies) is tested end to end. The pycuda fake keeps a
context stack and refuses memory and stream operations without a current context; it tracks leaks.
"""

from __future__ import annotations

import gzip
import json
import re
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SURFACE_DIR = Path(__file__).parent / "surfaces"
VERSIONS = {"10.3": "10.3.0", "10.16": "10.16.1.11", "11.4": "11.4.0.106"}
PLAN_MAGIC = b"FAKEPLAN\n"
CACHE_MAGIC = b"FAKECACHE\n"


# --- surfaces -------------------------------------------------------------------------------------------------
@dataclass
class Surface:
    version: str
    members: dict[str, set[str]] = field(default_factory=dict)  # class -> member names
    enums: dict[str, dict[str, int]] = field(default_factory=dict)  # enum class -> member -> value
    props: dict[str, str] = field(default_factory=dict)  # "Class.prop" -> ro | rw
    signatures: dict[str, str] = field(default_factory=dict)  # "Class.method" -> signature text
    module: set[str] = field(default_factory=set)  # module-level names (classes, functions, values)

    def has(self, qualified: str) -> bool:
        if "." not in qualified:
            return qualified in self.module
        cls, _, name = qualified.rpartition(".")
        return name in self.members.get(cls, set())


def load_surface(version: str) -> Surface:
    full = VERSIONS.get(version, version)
    text = gzip.decompress((SURFACE_DIR / f"surface-{full}.txt.gz").read_bytes()).decode()
    s = Surface(full)
    cls = None
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        kind = parts[0]
        if kind == "CLASS":
            cls = parts[1]
            s.members.setdefault(cls, set())
            if "." not in cls:
                s.module.add(cls)
        elif kind in ("ENUM", "METHOD", "PROP", "ATTR", "NESTED") and cls and line.startswith("  "):
            q = parts[1]
            owner = cls if q.startswith(cls + ".") else q.rpartition(".")[0]
            name = q[len(owner) + 1:]
            s.members.setdefault(owner, set()).add(name)
            if kind == "ENUM":
                s.enums.setdefault(owner, {})[name] = int(parts[3])
            elif kind == "PROP":
                s.props[q] = parts[2].strip("[]")
            elif kind == "METHOD":
                s.signatures[q] = line.split(None, 2)[2] if len(parts) > 2 else ""
        elif kind in ("FUNC", "VALUE"):
            s.module.add(parts[1])
    return s


# --- recording ------------------------------------------------------------------------------------------------
class Recorder:
    def __init__(self) -> None:
        self.names: list[str] = []  # every public attribute touched, "Class.member"
        self.calls: list[tuple[str, tuple, dict]] = []  # (qualified name, args, kwargs) of calls made

    def call(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.calls.append((name, args, kwargs))

    def seq(self, prefix: str = "") -> list[str]:
        return [c[0] for c in self.calls if c[0].startswith(prefix)]

    def find(self, name: str) -> list[tuple[tuple, dict]]:
        return [(a, k) for n, a, k in self.calls if n == name]


class FakeEnumMember:
    """A pybind11 enum value: not an int, no bit operations, equal only to itself."""

    def __init__(self, cls: FakeEnumType, name: str, value: int) -> None:
        self._cls, self.name, self.value = cls, name, value

    def __int__(self) -> int:
        return self.value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FakeEnumMember) and other._cls is self._cls and other.value == self.value

    def __hash__(self) -> int:
        return hash((self._cls.qualname, self.value))

    def __repr__(self) -> str:
        return f"<{self._cls.short}.{self.name}: {self.value}>"

    def __str__(self) -> str:
        return f"{self._cls.short}.{self.name}"


class FakeEnumType:
    def __init__(self, qualname: str, members: dict[str, int], rec: Recorder) -> None:
        self.qualname, self.short, self._rec = qualname, qualname.rpartition(".")[2], rec
        self.__members__ = {n: FakeEnumMember(self, n, v) for n, v in members.items()}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        self._rec.names.append(f"{self.qualname}.{name}")
        try:
            return self.__members__[name]
        except KeyError:
            raise AttributeError(f"type object '{self.short}' has no attribute '{name}'") from None

    def __call__(self, value: int) -> FakeEnumMember:
        for m in self.__members__.values():
            if m.value == value:
                return m
        raise ValueError(value)


def _want_enum(value: Any, enum: FakeEnumType, what: str) -> None:
    if not (isinstance(value, FakeEnumMember) and value._cls is enum):
        raise TypeError(f"{what}(): incompatible function arguments: expected {enum.short}, got {value!r}")


class Dims(tuple):
    """Behaves like a tuple, as the real Dims does."""

    MAX_DIMS = 8


# --- fake pycuda ------------------------------------------------------------------------------------------------
class FakeCuda:
    """State of the fake GPU shared by the pycuda fake and the TensorRT fake."""

    def __init__(self, rec: Recorder, gpu_name: str = "NVIDIA Orin (fake)", cc: tuple[int, int] = (8, 7)) -> None:
        self.rec, self.gpu_name, self.cc = rec, gpu_name, cc
        self.memory: dict[int, bytearray] = {}
        self.next_addr = 0x7F0000000000
        self.stack: list[Any] = []
        self.streams: set[int] = set()
        self.initialised = False
        self.module = self._make_module()

    def _need_ctx(self, what: str) -> None:
        if not self.initialised:
            raise self.module.LogicError(f"{what} failed: initialization error (cuInit not called)")
        if not self.stack:
            raise self.module.LogicError(f"{what} failed: invalid device context")

    def resolve(self, ptr: Any, nbytes: int) -> tuple[bytearray, int]:
        addr = int(ptr)
        for base, buf in self.memory.items():
            if base <= addr < base + len(buf):
                off = addr - base
                if off + nbytes > len(buf):
                    raise self.module.LogicError(f"copy of {nbytes} bytes overruns the allocation")
                return buf, off
        raise self.module.LogicError(f"invalid device pointer {addr:#x}")

    def _make_module(self) -> types.ModuleType:
        fc = self
        rec = self.rec
        m = types.ModuleType("pycuda.driver")

        class Error(Exception):
            pass

        class LogicError(Error):
            pass

        class MemoryError_(Error):  # noqa: N801
            pass

        class RuntimeError_(Error):  # noqa: N801
            pass

        m.Error, m.LogicError, m.MemoryError, m.RuntimeError = Error, LogicError, MemoryError_, RuntimeError_

        def init(flags: int = 0) -> None:
            rec.call("cuda.init", flags)
            fc.initialised = True

        class Context:
            def __init__(self) -> None:
                self.refs = 1

            def push(self) -> None:
                rec.call("cuda.Context.push")
                fc.stack.append(self)

            @staticmethod
            def pop() -> None:
                rec.call("cuda.Context.pop")
                if not fc.stack:
                    raise LogicError("context::pop failed: cannot pop non-current context")
                fc.stack.pop()

            def detach(self) -> None:
                rec.call("cuda.Context.detach")
                if self.refs <= 0:
                    raise LogicError("cannot detach from invalid context")
                self.refs -= 1

        class Device:
            def __init__(self, number: int) -> None:
                if not fc.initialised:
                    raise LogicError("cuDeviceGet failed: initialization error")
                self.number = number

            @staticmethod
            def count() -> int:
                return 1

            def name(self) -> str:
                return fc.gpu_name

            def compute_capability(self) -> tuple[int, int]:
                return fc.cc

            def retain_primary_context(self) -> Context:
                rec.call("cuda.Device.retain_primary_context")
                return Context()

            def make_context(self, flags: int = 0) -> Context:
                c = Context()
                c.push()
                return c

        class DeviceAllocation:
            def __init__(self, addr: int) -> None:
                self.addr, self.freed = addr, False

            def __int__(self) -> int:
                return self.addr

            __index__ = __int__

            def free(self) -> None:
                rec.call("cuda.DeviceAllocation.free")
                if self.freed:
                    raise LogicError("device_allocation::free failed: invalid resource handle")
                fc._need_ctx("cuMemFree")
                self.freed = True
                del fc.memory[self.addr]

        def mem_alloc(nbytes: int, /) -> DeviceAllocation:
            rec.call("cuda.mem_alloc", nbytes)
            fc._need_ctx("cuMemAlloc")
            if nbytes <= 0:
                raise LogicError("cuMemAlloc failed: invalid argument")
            addr = fc.next_addr
            fc.next_addr += (nbytes + 255) // 256 * 256 + 256
            fc.memory[addr] = bytearray(nbytes)
            return DeviceAllocation(addr)

        def pagelocked_empty(shape: Any, dtype: Any, order: str = "C", mem_flags: int = 0) -> np.ndarray:
            rec.call("cuda.pagelocked_empty", shape, dtype)
            fc._need_ctx("cuMemHostAlloc")
            return np.empty(shape, dtype=dtype, order=order)

        class Stream:
            def __init__(self, flags: int = 0) -> None:
                rec.call("cuda.Stream")
                fc._need_ctx("cuStreamCreate")
                self.handle = 0x5000 + len(fc.streams) + 1
                fc.streams.add(self.handle)

            def synchronize(self) -> None:
                rec.call("cuda.Stream.synchronize")
                fc._need_ctx("cuStreamSynchronize")

        def _stream_ok(stream: Any) -> None:
            if stream is not None and not isinstance(stream, Stream):
                raise TypeError("stream must be a Stream or None")

        def memcpy_htod_async(dest: Any, src: Any, stream: Any = None) -> None:
            fc._need_ctx("cuMemcpyHtoDAsync")
            _stream_ok(stream)
            mv = memoryview(src)
            if not mv.c_contiguous:
                raise ValueError("source buffer is not contiguous")
            rec.call("cuda.memcpy_htod_async", int(dest), mv.nbytes)
            buf, off = fc.resolve(dest, mv.nbytes)
            buf[off:off + mv.nbytes] = mv.cast("B")

        def memcpy_dtoh_async(dest: Any, src: Any, stream: Any = None) -> None:
            fc._need_ctx("cuMemcpyDtoHAsync")
            _stream_ok(stream)
            mv = memoryview(dest)
            if mv.readonly or not mv.c_contiguous:
                raise ValueError("destination must be a writable contiguous buffer")
            rec.call("cuda.memcpy_dtoh_async", int(src), mv.nbytes)
            buf, off = fc.resolve(src, mv.nbytes)
            mv.cast("B")[:] = buf[off:off + mv.nbytes]

        m.init, m.Context, m.Device, m.DeviceAllocation = init, Context, Device, DeviceAllocation
        m.mem_alloc, m.pagelocked_empty, m.Stream = mem_alloc, pagelocked_empty, Stream
        m.memcpy_htod_async, m.memcpy_dtoh_async = memcpy_htod_async, memcpy_dtoh_async
        return m


# --- fake tensorrt ----------------------------------------------------------------------------------------------
def make_fake_trt(version: str, cuda: FakeCuda, unsupported_ops: frozenset[str] = frozenset()) -> types.ModuleType:
    surf = load_surface(version)
    rec = cuda.rec
    major = int(surf.version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = surf.version
    enums = {name: FakeEnumType(name, vals, rec) for name, vals in surf.enums.items()}
    for name, e in enums.items():
        if "." not in name:
            setattr(trt, name, e)

    class Recorded:
        """Base of fake classes: public attribute access is recorded and checked against the surface."""

        _cls = ""

        def __getattribute__(self, name: str) -> Any:
            if not name.startswith("_"):
                cls = object.__getattribute__(self, "_cls")
                rec.names.append(f"{cls}.{name}")
                if not surf.has(f"{cls}.{name}"):
                    raise AttributeError(f"'{cls}' object has no attribute '{name}' (TensorRT {surf.version})")
            return object.__getattribute__(self, name)

    def no_ctor(cls: type) -> type:
        def __init__(self: Any, *a: Any, **k: Any) -> None:
            raise TypeError(f"tensorrt.{cls.__name__}: No constructor defined!")

        cls._make = classmethod(lambda c, **kw: _bypass(c, kw))  # type: ignore[attr-defined]
        cls.__init__ = __init__  # type: ignore[misc]
        return cls

    def _bypass(c: type, kw: dict[str, Any]) -> Any:
        obj = object.__new__(c)
        for k, v in kw.items():
            object.__setattr__(obj, k, v)
        return obj

    # Logger
    sev = enums["ILogger.Severity"]

    class ILogger(Recorded):
        _cls = "ILogger"
        Severity = sev

        def __init__(self) -> None:
            object.__setattr__(self, "_ilogger_init", True)

        def log(self, severity: Any, msg: str) -> None:
            pass

    class Logger(ILogger):
        _cls = "Logger"

        def __init__(self, min_severity: Any = None) -> None:
            ILogger.__init__(self)

    for n, v in sev.__members__.items():
        setattr(ILogger, n, v)
        setattr(Logger, n, v)

    def _check_logger(logger: Any, what: str) -> None:
        if not isinstance(logger, ILogger):
            raise TypeError(f"{what}: incompatible function arguments (logger)")
        try:
            object.__getattribute__(logger, "_ilogger_init")
        except AttributeError:
            raise TypeError("ILogger.__init__() must be called when overriding __init__") from None

    class HostMemory(bytes):
        """IHostMemory: the buffer protocol through bytes; nbytes and dtype properties."""

        def __getattribute__(self, name: str) -> Any:
            if not name.startswith("_"):
                rec.names.append(f"IHostMemory.{name}")
                if not surf.has(f"IHostMemory.{name}"):
                    raise AttributeError(f"'IHostMemory' object has no attribute '{name}'")
            return bytes.__getattribute__(self, name)

        @property
        def nbytes(self) -> int:
            return len(self)

        @property
        def dtype(self) -> Any:
            return enums["DataType"].__members__["UINT8"]

    @no_ctor
    class ITensor(Recorded):
        _cls = "ITensor"

    @no_ctor
    class INetworkDefinition(Recorded):
        _cls = "INetworkDefinition"

        @property
        def num_inputs(self) -> int:
            return len(self._inputs)

        @property
        def num_outputs(self) -> int:
            return len(self._outputs)

        def get_input(self, index: int) -> ITensor:
            return self._inputs[index]

        def get_output(self, index: int) -> ITensor:
            return self._outputs[index]

    @no_ctor
    class ParserError(Recorded):
        _cls = "ParserError"

        def desc(self) -> str:
            return self._desc

        def code(self) -> Any:
            return self._code

        def node(self) -> int:
            return self._node

        def node_name(self) -> str:
            return self._node_name

        def node_operator(self) -> str:
            return self._op

    class OnnxParser(Recorded):
        _cls = "OnnxParser"

        def __init__(self, network: Any, logger: Any) -> None:
            _check_logger(logger, "OnnxParser")
            rec.call("OnnxParser.__init__")
            object.__setattr__(self, "_net", network)
            object.__setattr__(self, "_errors", [])

        @property
        def num_errors(self) -> int:
            return len(self._errors)

        def get_error(self, index: int) -> ParserError:
            return self._errors[index]

        def _err(self, code: str, desc: str, node: int = -1, name: str = "", op: str = "") -> None:
            self._errors.append(ParserError._make(_desc=desc, _code=enums["ErrorCode"].__members__[code],
                                                  _node=node, _node_name=name, _op=op))

        def parse_from_file(self, model: str) -> bool:
            import onnx

            rec.call("OnnxParser.parse_from_file", model)
            try:
                proto = onnx.load(model)
            except Exception as e:  # noqa: BLE001
                self._err("MODEL_DESERIALIZE_FAILED", f"Failed to parse ONNX model: {e}")
                return False
            for i, n in enumerate(proto.graph.node):
                if n.op_type in unsupported_ops:
                    self._err("UNSUPPORTED_NODE", f"No importer registered for op: {n.op_type}", i, n.name,
                              n.op_type)
            if self._errors:
                return False
            net = self._net
            object.__setattr__(net, "_onnx", model)
            dt = enums["DataType"].__members__["FLOAT"]

            def shape(vi: Any) -> Dims:
                return Dims(d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim)

            object.__setattr__(net, "_inputs", [ITensor._make(name=v.name, shape=shape(v), dtype=dt)
                                                for v in proto.graph.input])
            object.__setattr__(net, "_outputs", [ITensor._make(name=v.name, shape=shape(v), dtype=dt)
                                                 for v in proto.graph.output])
            return True

    @no_ctor
    class IOptimizationProfile(Recorded):
        _cls = "IOptimizationProfile"

        def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002
            rec.call("IOptimizationProfile.set_shape", input, tuple(min), tuple(opt), tuple(max))
            if not all(a <= b <= c for a, b, c in zip(min, opt, max, strict=True)):
                raise ValueError("inconsistent optimization profile")
            self._shapes[input] = (Dims(min), Dims(opt), Dims(max))

    @no_ctor
    class ITimingCache(Recorded):
        _cls = "ITimingCache"

        def serialize(self) -> HostMemory:
            rec.call("ITimingCache.serialize")
            return HostMemory(CACHE_MAGIC + json.dumps(self._entries).encode())

    @no_ctor
    class IBuilderConfig(Recorded):
        _cls = "IBuilderConfig"

        def set_memory_pool_limit(self, pool: Any, pool_size: int) -> None:
            _want_enum(pool, enums["MemoryPoolType"], "set_memory_pool_limit")
            rec.call("IBuilderConfig.set_memory_pool_limit", pool.name, int(pool_size))
            self._pools[pool.name] = int(pool_size)

        def set_flag(self, flag: Any) -> None:
            _want_enum(flag, enums["BuilderFlag"], "set_flag")
            rec.call("IBuilderConfig.set_flag", flag.name)
            self._flags.add(flag.name)

        def add_optimization_profile(self, profile: Any) -> int:
            rec.call("IBuilderConfig.add_optimization_profile")
            if not profile._shapes:
                return -1
            self._profiles.append(profile)
            return len(self._profiles) - 1

        def create_timing_cache(self, serialized_timing_cache: Any) -> ITimingCache:
            data = bytes(serialized_timing_cache)
            rec.call("IBuilderConfig.create_timing_cache", len(data))
            entries: list[str] = []
            if data:
                if not data.startswith(CACHE_MAGIC):
                    raise RuntimeError("timing cache is corrupt")
                entries = json.loads(data[len(CACHE_MAGIC):])
            return ITimingCache._make(_entries=entries)

        def set_timing_cache(self, cache: Any, ignore_mismatch: bool) -> bool:
            rec.call("IBuilderConfig.set_timing_cache", bool(ignore_mismatch))
            self._cache = cache
            return True

        def get_timing_cache(self) -> Any:
            return self._cache

    class Builder(Recorded):
        _cls = "Builder"

        def __init__(self, logger: Any) -> None:
            _check_logger(logger, "Builder")
            rec.call("Builder.__init__")

        def create_network(self, flags: int = 0) -> INetworkDefinition:
            if not isinstance(flags, int) or isinstance(flags, bool):
                raise TypeError("create_network(): incompatible function arguments")
            rec.call("Builder.create_network", flags)
            return INetworkDefinition._make(_flags=flags, _inputs=[], _outputs=[])

        def create_builder_config(self) -> IBuilderConfig:
            rec.call("Builder.create_builder_config")
            return IBuilderConfig._make(_pools={}, _flags=set(), _profiles=[], _cache=None)

        def create_optimization_profile(self) -> IOptimizationProfile:
            rec.call("Builder.create_optimization_profile")
            return IOptimizationProfile._make(_shapes={})

        @property
        def platform_has_fast_fp16(self) -> bool:
            return True

        def build_serialized_network(self, network: Any, config: Any) -> HostMemory | None:
            rec.call("Builder.build_serialized_network")
            if not config._profiles:
                return None
            if config._cache is not None:
                config._cache._entries.append(f"tactics:{Path(network._onnx).name}")
            strongly = bool(network._flags & (1 << 1)) if major == 10 else True
            header = {"version": surf.version, "onnx": network._onnx, "fp16_flag": "FP16" in config._flags,
                      "strongly_typed": strongly,
                      "profile": {k: [list(d) for d in v] for k, v in config._profiles[0]._shapes.items()}}
            return HostMemory(PLAN_MAGIC + json.dumps(header).encode())

    @no_ctor
    class IExecutionContext(Recorded):
        _cls = "IExecutionContext"

        def set_input_shape(self, name: str, shape: Any) -> bool:
            rec.call("IExecutionContext.set_input_shape", name, tuple(shape))
            lo, _, hi = self._engine._profile[name]
            if len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
                return False
            self._shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name: str) -> Dims:
            b = self._shapes.get("image", (-1,))[0]
            size = self._engine._profile["image"][2][2:]
            return Dims({"image": self._shapes.get("image", (-1, 3, *size)), "anomaly_map": (b, 1, *size),
                         "score": (b,)}[name])

        def set_tensor_address(self, name: str, memory: Any) -> bool:
            rec.call("IExecutionContext.set_tensor_address", name)
            self._addr[name] = int(memory)
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            rec.call("IExecutionContext.execute_async_v3", stream_handle)
            if int(stream_handle) not in cuda.streams:
                return False
            if "image" not in self._shapes or set(self._addr) != {"image", "anomaly_map", "score"}:
                return False
            shape = self._shapes["image"]
            n = int(np.prod(shape)) * 4
            buf, off = cuda.resolve(self._addr["image"], n)
            x = np.frombuffer(bytes(buf[off:off + n]), np.float32).reshape(shape)
            maps, scores = self._engine._session().run(["anomaly_map", "score"], {"image": x})
            for name, arr in (("anomaly_map", maps), ("score", scores)):
                data = np.ascontiguousarray(arr, np.float32).tobytes()
                buf, off = cuda.resolve(self._addr[name], len(data))
                buf[off:off + len(data)] = data
            return True

    @no_ctor
    class ICudaEngine(Recorded):
        _cls = "ICudaEngine"
        _names = ("image", "anomaly_map", "score")

        @property
        def num_io_tensors(self) -> int:
            return 3

        def get_tensor_name(self, index: int) -> str:
            return self._names[index]

        def get_tensor_mode(self, name: str) -> Any:
            io = enums["TensorIOMode"].__members__
            return io["INPUT"] if name == "image" else io["OUTPUT"]

        def get_tensor_dtype(self, name: str) -> Any:
            return enums["DataType"].__members__["FLOAT"]

        def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Dims]:
            return [Dims(d) for d in self._profile[name]]

        def create_execution_context(self, strategy: Any = None) -> IExecutionContext:
            rec.call("ICudaEngine.create_execution_context")
            return IExecutionContext._make(_engine=self, _shapes={}, _addr={})

        def _session(self) -> Any:
            import onnxruntime as ort

            if self._sess is None:
                object.__setattr__(self, "_sess", ort.InferenceSession(self._onnx, providers=["CPUExecutionProvider"]))
            return self._sess

    class Runtime(Recorded):
        _cls = "Runtime"

        def __init__(self, logger: Any) -> None:
            _check_logger(logger, "Runtime")
            rec.call("Runtime.__init__")

        def deserialize_cuda_engine(self, serialized_engine: Any) -> ICudaEngine | None:
            data = bytes(memoryview(serialized_engine))
            rec.call("Runtime.deserialize_cuda_engine", len(data))
            if not cuda.stack:
                return None
            if not data.startswith(PLAN_MAGIC):
                return None
            try:
                header = json.loads(data[len(PLAN_MAGIC):])
            except ValueError:
                return None
            if header["version"] != surf.version:  # the real runtime logs a version error and returns None
                return None
            return ICudaEngine._make(_onnx=header["onnx"], _profile=header["profile"], _sess=None)

    def nptype(trt_type: Any) -> Any:
        table = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
                 "BOOL": np.bool_, "UINT8": np.uint8}
        if trt_type.name not in table:
            raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
        return table[trt_type.name]

    def volume(iterable: Any) -> int:
        v = 1
        for d in iterable:
            v *= d
        return v

    for obj in (ILogger, Logger, Builder, OnnxParser, Runtime, IBuilderConfig, IOptimizationProfile, ITimingCache,
                INetworkDefinition, ITensor, ICudaEngine, IExecutionContext, ParserError):
        setattr(trt, obj.__name__, obj)
    trt.IHostMemory, trt.Dims, trt.nptype, trt.volume = HostMemory, Dims, nptype, volume

    class _Module(types.ModuleType):
        def __getattribute__(self, name: str) -> Any:
            if not name.startswith("_"):
                rec.names.append(name)
            return super().__getattribute__(name)

    trt.__class__ = _Module
    return trt


@dataclass
class FakeGPU:
    """A fake TensorRT of one version plus a fake pycuda, sharing one recorder and one device memory."""

    version: str
    rec: Recorder
    cuda: FakeCuda
    trt: types.ModuleType

    def install(self, monkeypatch: Any) -> None:
        pkg = types.ModuleType("pycuda")
        pkg.driver = self.cuda.module  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "tensorrt", self.trt)
        monkeypatch.setitem(sys.modules, "pycuda", pkg)
        monkeypatch.setitem(sys.modules, "pycuda.driver", self.cuda.module)

    def unknown_names(self) -> list[str]:
        """Recorded names absent from this version's surface."""
        surf = load_surface(self.version)
        return sorted({n for n in self.rec.names if not surf.has(n)})


def fake_gpu(version: str, *, gpu_name: str = "NVIDIA Orin (fake)", cc: tuple[int, int] = (8, 7),
             unsupported_ops: frozenset[str] = frozenset()) -> FakeGPU:
    rec = Recorder()
    cuda = FakeCuda(rec, gpu_name, cc)
    return FakeGPU(version, rec, cuda, make_fake_trt(version, cuda, unsupported_ops))


def used_trt_names(source: str) -> set[str]:
    """`trt.X.Y` / `trt.X` names written in a source text (static complement to the recorded names)."""
    return {m.group(1) for m in re.finditer(r"\btrt\.([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?)", source)}


_SHARED: FakeGPU | None = None


def shared_gpu() -> FakeGPU:
    """One fake GPU per process, configured by $MAE_AD_FAKE_TRT (version) and $MAE_AD_FAKE_GPU (name)."""
    import os

    global _SHARED
    if _SHARED is None:
        _SHARED = fake_gpu(os.environ.get("MAE_AD_FAKE_TRT", "10.3"),
                           gpu_name=os.environ.get("MAE_AD_FAKE_GPU", "NVIDIA Orin (fake)"))
    return _SHARED
