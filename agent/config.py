"""The agent configuration: typed sections loaded from YAML with `section.key=value` overrides.

Every section forbids unknown keys, so a typo is an error naming the file and the key. Secrets are never read from
the YAML: the MQTT password comes from an environment variable (`mqtt.password_env`) or a file
(`mqtt.password_file`). No torch import here (nor OpenCV, nor paho).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mae_ad.contract import UserError, apply_overrides, format_validation_error, read_yaml

NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")  # camera names and agent ids appear in MQTT topics and folder names
BACKENDS = ("torch", "onnxruntime", "tensorrt", "brightness")

# --- credentials: one masking function for every text that leaves the agent -------------------------------------
# URL userinfo however it parses: everything between '://' and the last '@' of the same token (a raw '#', '/', '?'
# or '@' in a password does not hide it); the user name before the first ':' is kept.
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<info>[^\s'\"<>]*)@")
# key=value credentials: URL query strings (?pwd=..&password=..), GStreamer properties (user-pw=..), headers.
_SECRET_KEYS = ("password", "passwd", "pass", "pwd", "pw", "user-pw", "user_pw", "proxy-pw", "token",
                "access_token", "auth", "authorization", "apikey", "api_key", "api-key", "secret", "key")
_KEY_VALUE = re.compile(r"(?P<k>(?<![A-Za-z0-9_-])(?:" + "|".join(re.escape(k) for k in _SECRET_KEYS)
                        + r")\s*=\s*)(?P<v>\"[^\"]*\"|'[^']*'|[^&\s'\";!]*)", re.I)
MASK = "***"
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")


def env_var_named(name: str) -> str:
    """How an error names the environment variable a `*_env` key names: by its name when it looks like one
    (MQTT_PASSWORD), else not at all, in case a secret was written where its variable's name belongs."""
    return f"environment variable {name}" if _ENV_NAME.match(name) else \
        "the environment variable it names (not shown: it does not look like a variable name; is it the secret itself?)"


def redact(text: object) -> str:
    """`text` with every camera/broker credential replaced by ***: URL userinfo (`rtsp://user:***@host`, also
    when the password holds raw reserved characters), credential query keys (`pwd=***`, `password=***`,
    `token=***`...) and GStreamer properties (`user-pw=***`), wherever they sit in the text (a log line, an error,
    a pipeline)."""
    s = str(text)

    def _info(m: re.Match[str]) -> str:
        info = m.group("info")
        user, sep, _ = info.partition(":")
        if "/" in user or "?" in user or "#" in user:  # not a user name: mask all of it
            user, sep = "", ""
        return f"{m.group('scheme')}{user}{sep}{MASK}@" if sep else f"{m.group('scheme')}{MASK}@"

    s = _URL_USERINFO.sub(_info, s)
    return _KEY_VALUE.sub(lambda m: m.group("k") + MASK, s)


class RedactingFilter(logging.Filter):
    """A logging filter that passes every record's final text (and traceback) through `redact`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a bad format string: leave it to the handler to report
            return True
        clean = redact(msg)
        if clean != msg or record.args:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
            record.exc_info = None
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Put a RedactingFilter on every handler of `logger` (default: the root logger), once."""
    for h in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in h.filters):
            h.addFilter(RedactingFilter())


def url_credential_problem(url: str) -> str | None:
    """Why a URL's credentials cannot be parsed, or None: a raw '#', '/' or '?' in the password ends the host part
    early (urlsplit and FFmpeg then take part of the password for the port or host). The answer carries no secret."""
    from urllib.parse import urlsplit

    m = re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", url)
    if m is None:
        return None
    rest = url[m.end():]
    u = urlsplit(url)
    if "@" in u.netloc or "@" not in rest or ":" not in u.netloc:
        return None
    try:
        if u.port is not None:
            return None  # host:port, the '@' is later (in the path or query)
    except ValueError:
        pass  # "user:pass" read as host:port: the password holds a reserved character
    info = rest[:rest.rfind("@")]
    bad = sorted({c for c in info.partition(":")[2] if c in "/?#[]@"})
    codes = ", ".join(f"'{c}' as %{ord(c):02X}" for c in bad) or "reserved characters"
    return (f"the password in {redact(url)} must be percent-encoded: write {codes} "
            "(a password pa#ss/1 is written pa%23ss%2F1)")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    """Which engine scores the frames (through `trt.backends.open_backend`)."""

    backend: Literal["torch", "onnxruntime", "tensorrt", "brightness"] = "onnxruntime"
    path: str | None = Field(None, description="bundle dir (torch), .onnx (onnxruntime), .plan (tensorrt)")
    threads: int | None = Field(None, ge=1, description="CPU threads of the engine (None: its default)")
    max_batch: int | None = Field(None, ge=1, description="largest batch sent to the engine (None: the engine's)")
    tile_batch: int = Field(8, ge=1, description="a tiled model: at most this many tiles per engine call (memory grows "
                            "with the batch: about 0.5 GB a tile for 32x32-token tiles under ONNX Runtime)")
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
    decode: Literal["eager", "lazy"] = Field(
        "eager", description="eager: the reader decodes every frame; lazy (MJPEG files and URLs): it hands over "
                             "the JPEG and only the frames the loop scores are decoded")
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

    @field_validator("source")
    @classmethod
    def _credentials_parse(cls, v: int | str) -> int | str:
        if isinstance(v, str):  # the URL itself, or URLs inside a GStreamer pipeline (location=rtsp://...)
            for token in re.findall(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"!]+", v):
                problem = url_credential_problem(token)
                if problem:
                    raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _roi_inside_capture(self) -> CameraSection:
        r = self.roi
        if r is not None and self.width is not None and self.height is not None and \
                (r.x + r.width > self.width or r.y + r.height > self.height):
            raise ValueError(f"roi: x={r.x} y={r.y} width={r.width} height={r.height} reaches outside the "
                             f"{self.width}x{self.height} frame the camera is asked for (width/height)")
        return self

    @model_validator(mode="after")
    def _lazy_needs_a_stream(self) -> CameraSection:
        if self.decode == "lazy" and self.resolved_kind() not in ("file", "url"):
            raise ValueError(f"decode: lazy needs an MJPEG file or URL source; a {self.resolved_kind()} source is "
                             "decoded by OpenCV as it is read (use decode: eager)")
        if self.decode == "lazy" and self.colour != "bgr":
            raise ValueError(f"decode: lazy decodes JPEGs to BGR; colour: {self.colour} cannot apply")
        return self

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
    reconnect_max_s: float = Field(2.0, gt=0, description="cap of the exponential back-off (also bounds how long "
                                   "after a camera returns the agent notices it)")
    max_attempts: int = Field(0, ge=0, description="consecutive failed opens before status 'failed' (0: never)")
    watchdog_s: float = Field(10.0, gt=0, description="restart a streaming source that delivered no new frame for "
                              "this long, whatever the reason (the stall check below usually acts first)")
    open_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float = Field(5.0, gt=0, description="a read that brings no new frame within this long is a "
                                  "stalled camera: status reconnecting, the capture is closed and reopened")
    max_bad_frames: int = Field(25, ge=1, description="consecutive unreadable frames (damaged file frames, "
                                "undecodable JPEGs) skipped before the source counts as failed and is reopened")
    snapshot_fps: float = Field(5.0, gt=0, description="requests per second to a single-JPEG (snapshot) HTTP camera "
                                "whose camera entry sets no fps")

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
    client_id: str | None = Field(None, description="MQTT client id (None: mae-ad-<agent_id>-<host>-<pid>-<random>, "
                                  "unique per running process); an explicit id is used as given")
    prefix: str = "mae-ad"
    username: str | None = None
    password_env: str | None = Field(None, description="environment variable holding the password")
    password_file: str | None = Field(None, description="file holding the password (first line)")
    keepalive_s: int = Field(30, ge=5)
    reconnect_min_s: float = Field(0.5, gt=0, le=60, description="first retry after the broker is lost or unreachable")
    reconnect_max_s: float = Field(1.0, gt=0, le=3600, description="cap of the retry delay while the broker cannot be "
                                   "reached: scores flow again about this long (at most) after it returns")
    refused_backoff_max_s: float = Field(30.0, gt=0, le=3600, description="cap of the back-off while the broker "
                                         "answers but refuses (credentials, authorisation, TLS, client id taken over)")
    degraded_after_s: float = Field(30.0, gt=0, le=86400, description="/healthz reports degraded (and the log says so) "
                                    "after this long without the broker")
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

    @field_validator("client_id")
    @classmethod
    def _client_id_ok(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or len(v.encode()) > 65535 or any(ord(c) < 32 for c in v)):
            raise ValueError(f"{v!r}: a non-empty client id without control characters (or leave it unset for a "
                             "unique default)")
        return v

    @model_validator(mode="after")
    def _secret_sources(self) -> MqttSection:
        if self.password_env and self.password_file:
            raise ValueError("password_env and password_file: set one of them, not both")
        if (self.password_env or self.password_file) and not self.username:
            raise ValueError("username: required when a password source is set")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s: must be >= reconnect_min_s")
        if self.refused_backoff_max_s < self.reconnect_max_s:
            raise ValueError("refused_backoff_max_s: must be >= reconnect_max_s")
        return self

    def password(self) -> str | None:
        """Read the password from its environment variable or file (never from the YAML). Raises UserError."""
        if self.password_env:
            v = os.environ.get(self.password_env)
            if v is None:
                raise UserError(f"mqtt.password_env: {env_var_named(self.password_env)} is not set")
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
                raise UserError(f"web.token_env: {env_var_named(self.token_env)} is not set")
            where = f"web.token_env: {env_var_named(self.token_env)}"
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
    """Validate an agent config. Raises UserError (credentials masked) naming the source and the keys."""
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as e:
        raise UserError(redact(format_validation_error(e, source, model=AgentConfig))) from None


def load_agent_config(path: str | Path, overrides: list[str] | None = None) -> AgentConfig:
    """Load and validate an agent YAML, then apply `--set section.key=value` overrides (lists by index:
    `cameras.0.threshold=0.4`). Relative paths in the file stay relative to the working directory."""
    try:
        data = read_yaml(path)
        source = str(path)
        if overrides:
            source += " (with --set " + ", ".join(overrides) + ")"
        data = _apply_overrides_with_lists(data, overrides)
        return agent_config_from_dict(data, source)
    except UserError as e:  # every config error echoes --set values and sources: credentials masked
        raise UserError(redact(str(e))) from None


def _apply_overrides_with_lists(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Like mae_ad.contract.apply_overrides, but `cameras.0.key=value` reaches into the camera list."""
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


def dump_agent_config(cfg: AgentConfig, redacted: bool = False) -> str:
    """The config as YAML; `redacted` masks camera credentials (for printing: `mae-ad validate-config`)."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    return redact(text) if redacted else text
