"""The agent configuration: typed sections loaded from YAML with `section.key=value` overrides.

Every section forbids unknown keys, so a typo is an error naming the file and the key. Secrets are never read from
the YAML: the MQTT password comes from an environment variable (`mqtt.password_env`) or a file
(`mqtt.password_file`). No torch import here (nor OpenCV, nor paho).
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mae_ad.config import _format_validation_error, apply_overrides, read_yaml
from mae_ad.contract import UserError

NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")  # camera names and agent ids appear in MQTT topics and folder names
BACKENDS = ("torch", "onnxruntime", "tensorrt", "brightness")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    """Which engine scores the frames (through `trt.backends.open_backend`)."""

    backend: Literal["torch", "onnxruntime", "tensorrt", "brightness"] = "onnxruntime"
    path: str | None = Field(None, description="bundle dir (torch), .onnx (onnxruntime), .plan (tensorrt)")
    threads: int | None = Field(None, ge=1, description="CPU threads of the engine (None: its default)")
    max_batch: int | None = Field(None, ge=1, description="largest batch sent to the engine (None: the engine's)")
    device: str | None = None
    threshold: float | None = Field(None, description="overrides the model's calibrated threshold (all cameras)")
    input_size: int = Field(64, ge=8, description="only for backend=brightness (the test/demo engine)")

    @model_validator(mode="after")
    def _path_needed(self) -> ModelSection:
        if self.backend != "brightness" and not self.path:
            raise ValueError(f"path: required for backend {self.backend!r}")
        return self


class RoiSection(Section):
    """Region of interest in frame pixels; cropped before the resize."""

    x: int = Field(0, ge=0)
    y: int = Field(0, ge=0)
    width: int = Field(..., ge=1)
    height: int = Field(..., ge=1)


class CameraSection(Section):
    name: str
    source: int | str = Field(..., description="device index, file path, rtsp/http(s) URL, or GStreamer pipeline")
    kind: Literal["auto", "device", "file", "url", "gstreamer"] = "auto"
    reader: Literal["auto", "opencv", "mjpeg"] = Field(
        "auto", description="for http(s) URLs: mjpeg = built-in MJPEG/JPEG reader, opencv = FFmpeg; auto = mjpeg")
    loop: bool = Field(False, description="files: start again at the end")
    realtime: bool = Field(True, description="files: deliver frames at the file's frame rate (False: as fast as read)")
    fps: float | None = Field(None, gt=0, description="cap on frames read per second (None: source rate)")
    width: int | None = Field(None, ge=1, description="devices: requested capture width")
    height: int | None = Field(None, ge=1, description="devices: requested capture height")
    roi: RoiSection | None = None
    colour: Literal["bgr", "rgb", "gray"] = Field("bgr", description="channel order the source delivers")
    threshold: float | None = Field(None, description="per-camera threshold (wins over model.threshold)")
    open_after: int | None = Field(None, ge=1, description="per-camera alerts.open_after")
    close_after: int | None = Field(None, ge=1, description="per-camera alerts.close_after")
    score_interval_s: float | None = Field(None, ge=0, description="per-camera mqtt.score_interval_s")
    enabled: bool = True

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not NAME_RE.match(v) or v in ("cmd", "state", "stats", "status"):
            raise ValueError(f"{v!r}: use letters, digits, '_' or '-' (and not cmd/state/stats/status)")
        return v

    def resolved_kind(self) -> str:
        """device | file | url | gstreamer, from `kind` or guessed from `source`."""
        if self.kind != "auto":
            return self.kind
        s = self.source
        if isinstance(s, int) or (isinstance(s, str) and s.isdigit()):
            return "device"
        assert isinstance(s, str)
        if re.match(r"^(rtsp|rtsps|rtmp|http|https|udp|tcp)://", s, re.I):
            return "url"
        if "!" in s and ("appsink" in s or "src" in s):
            return "gstreamer"
        return "file"


class CaptureSection(Section):
    reconnect_initial_s: float = Field(0.5, gt=0, description="first reconnect delay")
    reconnect_max_s: float = Field(10.0, gt=0, description="cap of the exponential back-off")
    max_attempts: int = Field(0, ge=0, description="consecutive failed opens before status 'failed' (0: never)")
    watchdog_s: float = Field(10.0, gt=0, description="restart a source that delivered no frame for this long")
    open_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _order(self) -> CaptureSection:
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("reconnect_max_s: must be >= reconnect_initial_s")
        return self


class AlertSection(Section):
    open_after: int = Field(3, ge=1, description="consecutive anomalous frames that open an alert")
    close_after: int = Field(5, ge=1, description="consecutive normal frames that close it")
    update_interval_s: float = Field(1.0, ge=0, description="least time between two 'update' events of an alert")


class EvidenceSection(Section):
    enabled: bool = True
    dir: str = "evidence"
    max_alerts: int = Field(200, ge=1, description="alert folders kept (oldest deleted first)")
    max_age_days: float | None = Field(None, gt=0, description="also delete alert folders older than this")
    jpeg_quality: int = Field(90, ge=10, le=100)


class TlsSection(Section):
    ca_file: str | None = None
    cert_file: str | None = Field(None, description="client certificate (mutual TLS)")
    key_file: str | None = None
    insecure: bool = Field(False, description="skip the broker host name check (testing only)")


class SpoolSection(Section):
    dir: str = "spool"
    max_messages: int = Field(10000, ge=1, description="alert messages kept while the broker cannot take them")
    on_full: Literal["drop_oldest", "drop_newest"] = "drop_oldest"
    inflight: int = Field(20, ge=1, description="spooled messages handed to the broker before their PUBACKs")
    fsync: bool = True


class MqttSection(Section):
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    protocol: Literal["5", "3.1.1"] = "5"
    client_id: str | None = None
    prefix: str = "mae-ad"
    username: str | None = None
    password_env: str | None = Field(None, description="environment variable holding the password")
    password_file: str | None = Field(None, description="file holding the password (first line)")
    keepalive_s: int = Field(30, ge=5)
    reconnect_min_s: int = Field(1, ge=1)
    reconnect_max_s: int = Field(30, ge=1)
    tls: TlsSection | None = None
    score_interval_s: float = Field(0.0, ge=0, description="least time between two score messages (0: every frame)")
    score_qos: Literal[0, 1] = 0
    heatmap_interval_s: float = Field(0.0, ge=0, description="periodic heatmap JPEG per camera (0: only on alerts)")
    stats_interval_s: float = Field(10.0, gt=0)
    spool: SpoolSection = Field(default_factory=SpoolSection)
    shutdown_flush_s: float = Field(5.0, ge=0, description="time allowed at exit to deliver the spool")

    @field_validator("prefix")
    @classmethod
    def _prefix_ok(cls, v: str) -> str:
        if not v or any(c in v for c in "#+") or v.startswith("/") or v.endswith("/"):
            raise ValueError(f"{v!r}: a topic prefix without '#', '+' and leading/trailing '/'")
        return v

    @model_validator(mode="after")
    def _secret_sources(self) -> MqttSection:
        if self.password_env and self.password_file:
            raise ValueError("password_env and password_file: set one of them, not both")
        if (self.password_env or self.password_file) and not self.username:
            raise ValueError("username: required when a password source is set")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s: must be >= reconnect_min_s")
        return self

    def password(self) -> str | None:
        """Read the password from its environment variable or file (never from the YAML). Raises UserError."""
        if self.password_env:
            v = os.environ.get(self.password_env)
            if v is None:
                raise UserError(f"mqtt.password_env: environment variable {self.password_env} is not set")
            return v
        if self.password_file:
            p = Path(self.password_file)
            if not p.is_file():
                raise UserError(f"mqtt.password_file: {p} not found")
            lines = p.read_text().splitlines()
            return lines[0] if lines else ""
        return None


class HealthSection(Section):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(9108, ge=0, le=65535, description="0 picks a free port (tests)")
    stale_s: float = Field(30.0, gt=0, description="/healthz fails when the loop has not run for this long")


class WebSection(Section):
    """The live view (agent.web): a page with the frames, scores, alerts and health, and operator actions.

    The token that unlocks the actions (pause, resume, snapshot) comes from an environment variable or a file,
    never from the YAML. Binding to anything but a loopback address needs a token source.
    """

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(9109, ge=0, le=65535, description="0 picks a free port (tests)")
    token_env: str | None = Field(None, description="environment variable holding the action token")
    token_file: str | None = Field(None, description="file holding the action token (first line)")
    history_s: float = Field(300.0, gt=0, le=3600, description="seconds of scores kept for the chart")
    alerts_kept: int = Field(20, ge=1, le=500, description="closed alerts listed on the page")

    @model_validator(mode="after")
    def _token_for_remote(self) -> WebSection:
        if self.token_env and self.token_file:
            raise ValueError("token_env and token_file: set one of them, not both")
        if self.enabled and not _is_loopback(self.host) and not (self.token_env or self.token_file):
            raise ValueError(f"host: {self.host!r} is not a loopback address; a non-local bind needs the action "
                             "token configured (web.token_env or web.token_file)")
        return self

    def token(self) -> str | None:
        """Read the action token from its environment variable or file. Raises UserError when the source is
        missing or the token is empty. The value is never logged."""
        v: str | None = None
        if self.token_env:
            v = os.environ.get(self.token_env)
            if v is None:
                raise UserError(f"web.token_env: environment variable {self.token_env} is not set")
            where = f"web.token_env: environment variable {self.token_env}"
        elif self.token_file:
            p = Path(self.token_file)
            if not p.is_file():
                raise UserError(f"web.token_file: {p} not found")
            lines = p.read_text().splitlines()
            v = lines[0].strip() if lines else ""
            where = f"web.token_file: {p}"
        else:
            return None
        if not v.strip():
            raise UserError(f"{where} holds an empty token")
        return v.strip()


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AgentConfig(Section):
    agent_id: str = "agent1"
    model: ModelSection
    cameras: list[CameraSection] = Field(..., min_length=1)
    capture: CaptureSection = Field(default_factory=CaptureSection)
    alerts: AlertSection = Field(default_factory=AlertSection)
    evidence: EvidenceSection = Field(default_factory=EvidenceSection)
    mqtt: MqttSection = Field(default_factory=MqttSection)
    health: HealthSection = Field(default_factory=HealthSection)
    web: WebSection = Field(default_factory=WebSection)

    @field_validator("agent_id")
    @classmethod
    def _id_ok(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"{v!r}: use letters, digits, '_' or '-'")
        return v

    @model_validator(mode="after")
    def _unique_cameras(self) -> AgentConfig:
        seen: set[str] = set()
        for i, c in enumerate(self.cameras):
            if c.name in seen:
                raise ValueError(f"cameras.{i}.name: duplicate camera name {c.name!r}")
            seen.add(c.name)
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def agent_config_from_dict(data: dict[str, Any], source: str = "<agent config>") -> AgentConfig:
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as e:
        raise UserError(_format_validation_error(e, source)) from None


def load_agent_config(path: str | Path, overrides: list[str] | None = None) -> AgentConfig:
    """Load and validate an agent YAML, then apply `--set section.key=value` overrides (lists by index:
    `cameras.0.threshold=0.4`). Relative paths in the file stay relative to the working directory."""
    data = read_yaml(path)
    source = str(path)
    if overrides:
        source += " (with --set " + ", ".join(overrides) + ")"
    data = _apply_overrides_with_lists(data, overrides)
    return agent_config_from_dict(data, source)


def _apply_overrides_with_lists(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Like mae_ad.config.apply_overrides, but `cameras.0.key=value` reaches into the camera list."""
    plain: list[str] = []
    out = data
    for item in overrides or []:
        key = item.split("=", 1)[0]
        parts = key.strip().split(".")
        if len(parts) >= 3 and parts[0] == "cameras" and parts[1].isdigit():
            cams = out.get("cameras")
            idx = int(parts[1])
            if not isinstance(cams, list) or idx >= len(cams):
                raise UserError(f"--set {item!r}: there is no cameras.{idx}")
            sub = apply_overrides(cams[idx], [".".join(parts[2:]) + "=" + item.split("=", 1)[1]] if "=" in item
                                  else [item])
            out = {**out, "cameras": [*cams[:idx], sub, *cams[idx + 1:]]}
        else:
            plain.append(item)
    return apply_overrides(out, plain)


def dump_agent_config(cfg: AgentConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
