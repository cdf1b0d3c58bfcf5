"""What every stage agrees on, with no torch import: tensor names, bundle file names, the typed artefact metadata,
the typed result of every backend, and the helpers that read configuration files.

The agent (which must run without torch) and the exporter both read this module, so names cannot drift apart.

Artefact metadata: a bundle's `meta.json`, the `<file>.meta.json` sidecar of an ONNX model or TensorRT engine and
the copy of it in an ONNX graph's metadata_props are one family of records (`BundleMeta`, `OnnxMeta`, `EngineMeta`,
all `ArtefactMeta`), with one schema version, `SCHEMA_VERSION`. Writers build the record and `dump_meta` it;
readers `parse_meta`/`read_meta` it, so a wrong version or a missing or ill-typed field fails when the artefact is
loaded, with one `UserError` naming the file and the field. Keys a record does not name ride along unchanged.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Graph I/O names: the PyTorch scorer, the ONNX graph, the TensorRT engine and the agent use exactly these.
INPUT_NAME = "image"  # float32 [B, 3, H, W], RGB, values in [0, 1]
MAP_NAME = "anomaly_map"  # float32 [B, 1, H, W]
SCORE_NAME = "score"  # float32 [B]

# Model bundle: one directory.
BUNDLE_WEIGHTS = "weights.safetensors"  # model state dict (LoRA layers included unless merged)
BUNDLE_CONFIG = "config.yaml"  # the resolved configuration the model was trained with
BUNDLE_CALIBRATION = "calibration.json"  # threshold and score statistics from held-back normal images
BUNDLE_CALIB_TENSORS = "calibration.safetensors"  # per-pixel normal statistics (mean/std maps), optional
BUNDLE_META = "meta.json"  # versions, hashes, what made it
BUNDLE_FILES = (BUNDLE_WEIGHTS, BUNDLE_CONFIG, BUNDLE_META)

# The one schema version of the artefact metadata (bundle meta.json, ONNX and engine sidecars, ONNX
# metadata_props). Bump it when a field changes meaning or type; readers accept SUPPORTED_SCHEMA_VERSIONS.
SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = frozenset({1})
BUNDLE_FORMAT_VERSION = SCHEMA_VERSION  # the name older code and docs use

KIND_BUNDLE: Final = "mae_ad.bundle"
KIND_ONNX: Final = "mae_ad.onnx"
KIND_PLAN: Final = "mae_ad.plan"

RESIZE_POLICIES = ("squash", "letterbox", "tile")


class UserError(Exception):
    """A mistake the user can fix (bad path, bad key, bad file). The CLI prints it as one line, exit code 2."""


# --- configuration helpers (the learning stage's and the agent's YAML) -------------------------------------------
def _section_models(annotation: Any) -> dict[type[BaseModel], bool]:
    """The section models a field's annotation holds (`Model`, `Model | None`, `list[Model]`), each once, mapped to
    whether it comes as a list."""
    import typing

    subs: dict[type[BaseModel], bool] = {}
    for t in [annotation, *typing.get_args(annotation)]:
        for u in [t, *typing.get_args(t)]:
            if isinstance(u, type) and issubclass(u, BaseModel):
                subs[u] = subs.get(u, False) or typing.get_origin(t) is list
    return subs


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the section at `loc` (a validation error's location, list indices included) of `model`;
    [] where the path leaves the models (a dict, a list of scalars)."""
    node: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(node, "model_fields", None)
        if not fields or part not in fields:
            return []
        subs = _section_models(fields[part].annotation)
        if not subs:
            return []
        node = list(subs)[-1]
    return list(getattr(node, "model_fields", {}))


def _paths_named(model: type[BaseModel], name: str, prefix: str = "") -> list[str]:
    """Dotted paths of every key called `name` in `model`'s sections (a key written into the wrong section)."""
    out = []
    for field, info in getattr(model, "model_fields", {}).items():
        path = f"{prefix}{field}"
        if field == name:
            out.append(path)
        for u, is_list in _section_models(info.annotation).items():
            if u is not model:
                out += _paths_named(u, name, path + ("[]." if is_list else "."))
    return list(dict.fromkeys(out))


def format_validation_error(err: ValidationError, source: str, what: str = "configuration",
                            model: type[BaseModel] | None = None) -> str:
    """One line naming every field at fault: `<source>: invalid <what>: a.b: msg; c: msg`. With `model` (the class
    validated), an unknown key gets the nearest known key of its section (`did you mean 'epochs'?`, difflib)."""
    import difflib

    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            key = str(e["loc"][-1]) if e["loc"] else ""
            known = _known_keys(model, tuple(e["loc"][:-1])) if model is not None and e["loc"] else []
            # keys it begins (mask -> mask_ratio, mask_mode), else the closest spelling
            near = [k for k in known if k.startswith(key + "_")][:3] or difflib.get_close_matches(key, known, n=1,
                                                                                                  cutoff=0.6)
            elsewhere = _paths_named(model, key) if model is not None and key else []
            if f"{key}_env" in known:  # a secret written into the config: never point at a key to write it into
                msg += (f" (a secret never goes in the config: set {key}_env to the NAME of an environment variable "
                        f"that holds it, or {key}_file to a file)")
            elif elsewhere:  # the right key in the wrong section
                msg += " (did you mean " + " or ".join(repr(p) for p in elsewhere[:3]) + "?)"
            elif near:
                msg += " (did you mean " + " or ".join(repr(k) for k in near) + "?)"
        msg = msg.removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)  # whole-config checks name their keys in the message
    return f"{source}: invalid {what}: " + "; ".join(parts)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (['section', 'key'], value parsed as YAML)."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise UserError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """A copy of `data` with every `section.key=value` override set."""
    data = copy.deepcopy(data)
    for item in overrides or []:
        path, value = parse_override(item)
        node = data
        for p in path[:-1]:
            nxt = node.setdefault(p, {})
            if isinstance(nxt, list):
                raise UserError(f"--set {item!r}: {p} is a list: name an item by its index ({p}.0.<key>=...)")
            if not isinstance(nxt, dict):
                raise UserError(f"--set {item!r}: {p} is not a section")
            node = nxt
        node[path[-1]] = value
    return data


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML config file as a mapping (empty file: {}); UserError naming the file otherwise."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{p}: top level must be a mapping of sections")
    return data


# --- artefact metadata ----------------------------------------------------------------------------------------
class Record(BaseModel):
    """A metadata record: the fields it names are typed; keys it does not name are kept as they are."""

    model_config = ConfigDict(extra="allow", strict=True)  # JSON types as they are: "32" is not a size


class InputSpec(Record):
    """What the graph's input is: [B, channels, size, size], RGB in [0, 1]; mean/std are applied inside it."""

    size: int = Field(ge=1)
    channels: int | None = None
    layout: str | None = None
    range: list[int | float] | None = None
    colour: str | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    resize: Literal["squash", "letterbox", "tile"] = "squash"
    tile_scale: float | int | None = Field(None, gt=0)  # resize=tile: working size / image size (mae_ad.tiling)
    tile_overlap: int | None = Field(None, ge=0)  # resize=tile: minimum overlap of neighbouring tiles, pixels


class ScoringSpec(Record):
    """The scoring settings a model was made with (the whole `scoring` section); the agent needs the score rule."""

    reduce: Literal["max", "topk_mean"] = "max"
    topk_fraction: float = Field(0.01, gt=0, le=1)


class ParentRef(Record):
    """The artefact this one was made from."""

    bundle: str | None = None
    bundle_sha256: str | None = None
    weights_sha256: str | None = None
    model_id: str | None = None
    onnx_sha256: str | None = None


class GpuInfo(Record):
    name: str
    compute_capability: str
    index: int | None = None


Precision = Literal["fp32", "fp16", "int8"]


class ArtefactMeta(Record):
    """What every artefact says about itself and every backend reports (`Backend.meta`)."""

    format_version: int
    kind: str
    created: str | None = None
    model_id: str
    name: str | None = None
    threshold: float | None = None
    input: InputSpec
    scoring: ScoringSpec | None = None
    precision: Precision | None = None
    parent: ParentRef | None = None
    versions: dict[str, str] | None = None


class BundleMeta(ArtefactMeta):
    """`meta.json` of a model bundle (mae_ad.bundle, trt.merge). Required: what a reader cannot do without
    (version, kind, model_id, input.size); the rest is typed where present and defaults where absent."""

    kind: Literal["mae_ad.bundle"]
    weights_sha256: str | None = None
    lora: bool | None = None
    merged: bool = False
    calibrated: bool | None = None
    merged_layers: int | None = None
    training: dict[str, Any] | None = None


class OnnxMeta(ArtefactMeta):
    """`model.onnx.meta.json` and the graph's metadata_props record (trt.export, trt.quantize)."""

    kind: Literal["mae_ad.onnx"]
    calibration: dict[str, Any] | None = None
    outputs: dict[str, str] | None = None
    io_dtype: str | None = None
    opset: int | None = None
    exporter: str | None = None
    dynamic_batch: bool | None = None
    max_batch_hint: int | None = Field(None, ge=1)
    external_data: bool | None = None
    merged: bool | None = None
    merged_at_export: bool | None = None
    tensorrt_check: dict[str, list[str]] | None = None
    verify: dict[str, Any] | None = None
    export_seconds: float | None = None
    onnx_sha256: str | None = None
    onnx_bytes: int | None = None
    quantization: dict[str, Any] | None = None
    parent_onnx: dict[str, Any] | None = None


class EngineMeta(ArtefactMeta):
    """`model.plan.meta.json` of a TensorRT engine (trt.build); the runtime needs nothing but this and the plan."""

    kind: Literal["mae_ad.plan"]
    tensorrt_version: str  # with gpu: what the runtime checks before it deserialises the plan
    gpu: GpuInfo
    onnx: str = "model.onnx"
    onnx_sha256: str | None = None
    strongly_typed: bool | None = None
    profile: dict[str, Any] | None = None
    max_batch: int | None = Field(None, ge=1)
    workspace_mb: int | None = None
    build_seconds: float | None = None
    plan_sha256: str | None = None


M = TypeVar("M", bound=ArtefactMeta)


def parse_meta(data: Any, model: type[M], source: str) -> M:
    """Validate an artefact record; UserError `<source>: ...` naming the field at fault. The schema version is
    checked first: a record of another version is refused as such, not as a list of odd fields."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a JSON object (mae-ad artefact metadata)")
    if "format_version" not in data:
        raise UserError(f"{source}: format_version: missing (not mae-ad artefact metadata)")
    version = data["format_version"]
    if type(version) is not int or version not in SUPPORTED_SCHEMA_VERSIONS:
        readable = ", ".join(str(v) for v in sorted(SUPPORTED_SCHEMA_VERSIONS))
        raise UserError(f"{source}: format_version: {version!r} is not supported (this mae-ad reads version "
                        f"{readable}); re-create the artefact with this version of mae-ad")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise UserError(format_validation_error(e, source, "metadata")) from None


def read_meta(path: str | os.PathLike[str], model: type[M], what: str) -> M:
    """Read and validate the metadata JSON file `path` (a bundle's meta.json or a sidecar)."""
    return parse_meta(read_json(path, what), model, str(path))


def dump_meta(meta: ArtefactMeta) -> dict[str, Any]:
    """The record as JSON-ready data: the fields that were given (unset defaults are not written)."""
    return meta.model_dump(mode="json", exclude_unset=True)


# --- the result of every backend --------------------------------------------------------------------------------
class Prediction(NamedTuple):
    """One batch as every backend returns it (`Backend.infer`), in input order; unpacks as `maps, scores`."""

    maps: Any  # numpy float32 [B, 1, S, S]: the anomaly map of each image
    scores: Any  # numpy float32 [B]: the image score (> threshold: anomalous)

    @classmethod
    def checked(cls, maps: Any, scores: Any, source: str) -> Prediction:
        """Float32 copies-if-needed of an engine's outputs, refused (ValueError naming `source`) unless they are
        [B, 1, S, S] maps and [B] scores of the same B."""
        import numpy as np

        maps = np.asarray(maps).astype(np.float32, copy=False)
        scores = np.asarray(scores).astype(np.float32, copy=False).reshape(-1)
        if maps.ndim != 4 or maps.shape[1] != 1 or maps.shape[0] != scores.shape[0]:
            raise ValueError(f"{source}: expected maps [B, 1, S, S] and scores [B], got {tuple(maps.shape)} and "
                             f"{tuple(scores.shape)}")
        return cls(maps, scores)


def threshold_from_scores(scores: Any, target_fpr: float) -> float:
    """The decision threshold for normal-image scores [N]: their (1 - target_fpr) quantile, taking the next higher
    observed score ("higher"), so at most target_fpr of these normals lie above it; with N < 1 / target_fpr that is
    their maximum. Calibration (`mae_ad.scoring.calibrate`) and a camera's taught threshold (`agent.teach`) use it.
    Raises ValueError for no scores or target_fpr outside (0, 1)."""
    import numpy as np

    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise ValueError("no normal scores to set a threshold on")
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must lie in (0, 1), got {target_fpr}")
    return float(np.quantile(s, 1.0 - target_fpr, method="higher"))


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a file so that a reader never sees half of it (temp file in the same folder, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_creatable(out: str | os.PathLike[str], option: str = "--out") -> None:
    """UserError when `out` cannot be created because an existing ancestor of it is a file, or a folder this
    process cannot write (checked before any work, so nothing is scored or computed first)."""
    p = Path(out).absolute().parent
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise UserError(f"{option} {out}: {p} is a file, not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"{option} {out}: cannot create it under {p} (permission denied)")


def refuse_existing_out(out: str | os.PathLike[str], what: str, option: str = "--out") -> None:
    """UserError, before any work, when the output folder `out` cannot be created (`check_creatable`: a file among its
    parents, no permission) or already exists as a file or a non-empty folder. `staged_dir` checks again when
    writing."""
    out = Path(out)
    check_creatable(out, option)
    if out.is_symlink() and not out.exists():
        raise UserError(f"{out}: a dangling symbolic link is there; refusing to overwrite it (choose another {option})")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: already exists and is a file, not a folder; refusing to overwrite it with the {what} "
                        f"(choose another {option})")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: already exists and is not empty; refusing to overwrite the {what} "
                        f"(choose another {option})")


@contextmanager
def staged_dir(out: str | os.PathLike[str], what: str = "bundle") -> Iterator[Path]:
    """Yield a temporary directory next to `out`; on success rename it to `out`, so a crash never leaves half an
    artefact. Refuses an existing `out` that is not an empty directory."""
    out = Path(out)
    refuse_existing_out(out, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        for f in tmp.rglob("*"):  # mkstemp-created files are 0600: give them the usual umask permissions
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~_umask())
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: str | os.PathLike[str], what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def is_bundle(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    return p.is_dir() and (p / BUNDLE_META).is_file() and (p / BUNDLE_WEIGHTS).is_file()


def read_bundle_meta(path: str | os.PathLike[str]) -> BundleMeta:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: bundle directory not found")
    if not is_bundle(p):
        raise UserError(f"{p}: not a model bundle (expected {BUNDLE_META} and {BUNDLE_WEIGHTS} inside)")
    return read_meta(p / BUNDLE_META, BundleMeta, "bundle metadata")


def read_calibration(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Calibration of a bundle; raises UserError if the bundle was never calibrated."""
    p = Path(path) / BUNDLE_CALIBRATION
    if not p.is_file():
        raise UserError(f"{Path(path)}: bundle has no calibration ({BUNDLE_CALIBRATION} missing); run `mae-ad calibrate`")
    cal = read_json(p, "calibration")
    if "threshold" not in cal:
        raise UserError(f"{p}: key 'threshold' missing")
    return cal


# --- resize policy: how an image of any shape becomes the model's square input ------------------------------------
# squash: the whole image resized to S x S (aspect ratio not kept; every pixel of the input is the image).
# letterbox: resized so its longer side is S (aspect ratio kept), centred, and the rest of the square filled by
#   mirroring the image at its edges (numpy "reflect"). Mirrored content rather than a constant colour: a pretrained
#   backbone and the MAE see no artificial edge at the border of the image, and a filled cell looks like normal
#   content, not like a flat defect. The filled part is then ignored: the map there is set to the valid minimum and
#   the image score is taken over the valid region only (`score_valid`).
# Every stage (training, calibration, evaluation, predict, the agent) goes through `fit_image` and `Placement`, and
# the bundle/ONNX metadata record the policy as input.resize; the exported graph keeps its fixed square input.
# RESIZE_POLICIES (above) names them.


@dataclass(frozen=True)
class Placement:
    """Where an image of `src_h` x `src_w` pixels lies in the model's `size` x `size` input: the valid region is
    rows top..top+height, columns left..left+width (the whole square for squash)."""

    size: int
    top: int
    left: int
    height: int
    width: int
    src_h: int
    src_w: int

    @property
    def full(self) -> bool:
        return self.top == 0 and self.left == 0 and self.height == self.size and self.width == self.size


def placement(src_h: int, src_w: int, size: int, policy: str = "squash") -> Placement:
    """The `Placement` of an image of src_h x src_w pixels (>= 1 each) under `policy` ('squash' or 'letterbox').
    Letterbox: the longer side becomes `size`, the shorter round(side * size / longer) (at least 1), centred (an
    odd leftover puts the extra pixel after the image). Raises ValueError for an unknown policy or empty image."""
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"data.resize: unknown policy {policy!r}; choose one of {', '.join(RESIZE_POLICIES)}")
    if policy == "tile":
        raise ValueError("data.resize=tile cuts an image into tiles (mae_ad.tiling); it has no single placement")
    if src_h < 1 or src_w < 1 or size < 1:
        raise ValueError(f"cannot place a {src_w}x{src_h} image in a {size}x{size} input")
    if policy == "squash":
        return Placement(size, 0, 0, size, size, src_h, src_w)
    scale = size / max(src_h, src_w)
    h = min(size, max(1, int(round(src_h * scale))))
    w = min(size, max(1, int(round(src_w * scale))))
    return Placement(size, (size - h) // 2, (size - w) // 2, h, w, src_h, src_w)


def fit_image(img: Any, size: int, policy: str = "squash") -> tuple[Any, Placement]:
    """An image [H, W] or [H, W, C] (any dtype cv2 resizes) -> ([S, S] or [S, S, C] of the same dtype, placement).
    Resize: area averaging when both sides shrink, else bilinear; letterbox fills the rest by reflection."""
    import cv2
    import numpy as np

    pl = placement(int(img.shape[0]), int(img.shape[1]), size, policy)
    if (pl.src_h, pl.src_w) != (pl.height, pl.width):
        shrink = pl.height < pl.src_h and pl.width < pl.src_w
        img = cv2.resize(np.ascontiguousarray(img), (pl.width, pl.height),
                         interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    if pl.full:
        return img, pl
    pad = [(pl.top, size - pl.top - pl.height), (pl.left, size - pl.left - pl.width)] + [(0, 0)] * (img.ndim - 2)
    return np.pad(img, pad, mode="reflect"), pl


def valid_mask(pl: Placement) -> Any:
    """bool [S, S]: True on the image, False on the letterbox fill."""
    import numpy as np

    m = np.zeros((pl.size, pl.size), bool)
    m[pl.top:pl.top + pl.height, pl.left:pl.left + pl.width] = True
    return m


def crop_valid(amap: Any, pl: Placement) -> Any:
    """A model-size map [..., S, S] -> its valid region [..., height, width] (a view)."""
    return amap[..., pl.top:pl.top + pl.height, pl.left:pl.left + pl.width]


def mask_fill(amap: Any, pl: Placement) -> Any:
    """A model-size map [..., S, S] with the letterbox fill set to the valid region's minimum (a copy; the map
    itself for squash), so a heatmap or a box never shows the fill."""
    if pl.full:
        return amap
    import numpy as np

    out = np.array(amap, copy=True)
    lo = crop_valid(out, pl).min()
    out[..., ~valid_mask(pl)] = lo
    return out


def score_valid(amap: Any, pl: Placement, reduce: str = "max", topk_fraction: float = 0.01) -> float:
    """The image score from a model-size map [S, S] (or [1, S, S]) over the valid region only: its maximum, or
    (reduce='topk_mean') the mean of its round(topk_fraction * valid pixels) largest values (at least 1), the rule
    of `Scorer.reduce_map` applied to the image's own pixels."""
    import numpy as np

    v = np.asarray(crop_valid(amap, pl), dtype=np.float64).reshape(-1)
    if reduce == "max":
        return float(v.max())
    k = max(1, int(round(topk_fraction * v.size)))
    return float(np.partition(v, v.size - k)[v.size - k:].mean())


def map_to_source(amap: Any, pl: Placement) -> Any:
    """A model-size map [S, S] -> float32 [src_h, src_w]: the valid region cropped, then resized bilinearly to
    the image's own size (the map is upsampled, a mask never needs to be downsampled)."""
    import cv2
    import numpy as np

    v = np.ascontiguousarray(crop_valid(np.asarray(amap, dtype=np.float32).reshape(pl.size, pl.size), pl))
    if v.shape == (pl.src_h, pl.src_w):
        return v
    return cv2.resize(v, (pl.src_w, pl.src_h), interpolation=cv2.INTER_LINEAR)
