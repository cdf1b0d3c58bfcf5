"""The MQTT link (paho-mqtt 2.x, callback API version 2): topics, last will, commands, TLS and spool delivery.

Topics, all under `<prefix>/<agent_id>/` (payloads in docs/agent.md):
  status                  retained, "online"; "offline" as last will and on clean exit
  <camera>/status         retained, "streaming" | "reconnecting" | "failed" | "ended" | "paused"
  <camera>/score          JSON per scored frame (or rate limited), QoS 0 (mqtt.score_qos)
  <camera>/alert          JSON alert lifecycle (start/update/end), QoS 1, through the durable spool
  <camera>/heatmap        JPEG overlay bytes, QoS 0, on alert start/peak, on snapshot and every heatmap_interval_s
  <camera>/snapshot       JPEG of the camera frame, on the snapshot command
  stats                   JSON every stats_interval_s
  cmd/<camera>/<command>  commands in: pause, resume, threshold, snapshot (<camera> may be "all")
  state/<camera>/<command> the answer to each command (JSON); a malformed command topic cmd/<levels...> is answered
                          on state/<levels...>

Connection faults: every failed attempt is classified (name not resolved, port refused, no answer, TLS handshake or
certificate, refused CONNACK, closed before CONNACK, client id taken over by another connection) into one cause
string. The cause is logged when it changes and then every `REMIND_S` as a reminder, is `mqtt_error` in /healthz, and
after `mqtt.degraded_after_s` without the broker the agent reports itself degraded. While the broker cannot be
reached the retry delay goes from `mqtt.reconnect_min_s` to `mqtt.reconnect_max_s` (short: scores flow again soon
after the broker returns); while it answers but refuses (nothing but a fix helps) the back-off grows to
`mqtt.refused_backoff_max_s`.

Delivery of alerts: the message is first written to the spool, then handed to paho (at most `spool.inflight`
at a time, in order); paho keeps a QoS 1 message until its PUBACK, across reconnects; the PUBACK deletes the
spool file. Messages not handed over yet wait in the spool, so an outage or a restart loses nothing.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mae_ad.contract import UserError

from .config import MqttSection
from .spool import Spool

log = logging.getLogger(__name__)

CommandHandler = Callable[[str, str, bytes], "dict[str, Any] | None"]

REMIND_S = 60.0  # an unchanged connection fault is logged again this often
TAKEOVER_WINDOW_S = 10.0  # a connection the broker closes sooner than this after accepting it counts as short-lived
SESSION_TAKEN_OVER = 142  # MQTT 5 DISCONNECT reason codes (paho reports its own failures with them too)
KEEPALIVE_TIMEOUT = 141


def default_client_id(agent_id: str) -> str:
    """`mae-ad-<agent_id>-<host>-<pid>-<4 hex>`: unique per running process, so two agents (two boxes, or two copies
    on one box, or two containers with pid 1) never take the client id over from each other."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:32] or "host"
    return f"mae-ad-{agent_id}-{host}-{os.getpid()}-{secrets.token_hex(2)}"


def preflight(cfg: MqttSection) -> None:
    """Check what the connection needs from local files before anything starts: the password source and the TLS
    files (present, readable, loadable). Raises UserError naming the key."""
    cfg.password()
    t = cfg.tls
    if t is None:
        return
    for key, path in (("ca_file", t.ca_file), ("cert_file", t.cert_file), ("key_file", t.key_file)):
        if path and not Path(path).is_file():
            raise UserError(f"mqtt.tls.{key}: {path} not found")
    if bool(t.cert_file) != bool(t.key_file):
        raise UserError("mqtt.tls.cert_file and mqtt.tls.key_file: set both for a client certificate")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if t.ca_file:
        try:
            ctx.load_verify_locations(cafile=t.ca_file)
        except (ssl.SSLError, OSError) as e:
            raise UserError(f"mqtt.tls.ca_file: {t.ca_file} is not a readable PEM CA certificate ({e})") from None
    if t.cert_file and t.key_file:
        try:
            ctx.load_cert_chain(t.cert_file, t.key_file)
        except (ssl.SSLError, OSError) as e:
            raise UserError(f"mqtt.tls.cert_file / key_file: {t.cert_file}, {t.key_file}: cannot load the client "
                            f"certificate and key ({e})") from None


def describe_connect_error(err: BaseException | None, host: str, port: int, tls: bool) -> tuple[str, bool]:
    """Why a TCP/TLS connection attempt failed, in words for an operator. Returns (cause, needs_fix): needs_fix is
    True where retrying cannot help until something is changed (TLS trust, certificates)."""
    where = f"{host}:{port}"
    if err is None:
        return f"cannot connect to {where} (no detail from the MQTT client)", False
    if isinstance(err, socket.gaierror):
        return (f"cannot resolve the broker host {host!r} ({err.strerror or err}): check mqtt.host and the DNS", False)
    if isinstance(err, ssl.SSLCertVerificationError):
        return (f"TLS: the broker's certificate at {where} is not accepted ({err.verify_message or err.reason}): "
                "mqtt.tls.ca_file must hold the CA that signed it, and mqtt.host must match its name", True)
    if isinstance(err, ssl.SSLError):
        hint = " (is this port a TLS listener? without TLS leave mqtt.tls unset)"
        return f"TLS handshake with {where} failed: {err.reason or err}{hint}", True
    if isinstance(err, ConnectionRefusedError):
        return f"connection to {where} refused: no broker is listening there (broker down, or wrong mqtt.port)", False
    if isinstance(err, (TimeoutError, socket.timeout)):
        return (f"no answer from {where} (timed out): host down, or a firewall dropping the port", False)
    if isinstance(err, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        hint = " (with mqtt.tls set: is this port a TLS listener?)" if tls else ""
        return f"{where} closed the connection during the handshake ({err.strerror or err}){hint}", bool(tls)
    if isinstance(err, OSError) and err.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL):
        return f"cannot reach {where}: {err.strerror} (network or route down)", False
    return f"cannot connect to {where}: {type(err).__name__}: {err}", False


class MqttLink:
    def __init__(self, cfg: MqttSection, agent_id: str, spool: Spool, on_command: CommandHandler | None = None,
                 on_connected: Callable[[], None] | None = None):
        self.cfg = cfg
        self.agent_id = agent_id
        self.base = f"{cfg.prefix}/{agent_id}"
        self.spool = spool
        self.on_command = on_command
        self.on_connected = on_connected
        self.client_id = cfg.client_id or default_client_id(agent_id)
        self.connected = False
        self.ever_connected = False
        self.last_error: str | None = None  # the cause of the last failure (kept while connected only when flapping)
        self.connects = 0
        self.attempts = 0  # connection attempts (TCP, TLS, CONNECT)
        self.failures = 0  # failed attempts and lost connections since the last lasting connection
        self.refusals = 0  # CONNACKs with a failure reason (bad credentials, not authorised)
        self.duplicate_agent_seen = 0  # 'online' published by another client on our status topic (MQTT 5)
        self.disconnected_since: float | None = None  # monotonic; None while connected
        self._connected_at = 0.0
        self._short_lived = 0  # connections closed by the broker right after it accepted them, in a row
        self._connack = False  # a CONNACK was received in the current attempt
        self._logged_cause: str | None = None
        self._last_log = 0.0
        self._degraded_logged = False
        self._backoff: tuple[float, float] | None = None
        self._last_dup_log = -1e9
        self.publish_failures = 0
        self.alerts_acked = 0
        self.alerts_rejected = 0
        self._client: Any = None
        self._pump_lock = threading.Lock()
        self._map_lock = threading.Lock()
        self._mid_to_seq: dict[int, int] = {}
        self._early_acks: set[int] = set()
        self._stopping = False

    def topic(self, *parts: str) -> str:
        return "/".join((self.base, *parts))

    # --- connection state for /healthz ------------------------------------------------------------------------
    def disconnected_for(self) -> float:
        """Seconds since the broker was last connected (or since start); 0.0 while connected."""
        if self.connected or self.disconnected_since is None:
            return 0.0
        return time.monotonic() - self.disconnected_since

    @property
    def degraded(self) -> bool:
        """True after `mqtt.degraded_after_s` without the broker, or while the connection keeps being taken over."""
        return self.disconnected_for() >= self.cfg.degraded_after_s or self._flapping()

    def error(self) -> str | None:
        """The current connection fault in words (None when connected and stable)."""
        if not self.connected or self._flapping():
            return self.last_error
        return None

    def health(self) -> dict[str, Any]:
        """The MQTT fields of /healthz."""
        return {"mqtt_connected": self.connected, "mqtt_error": self.error(),
                "mqtt_disconnected_s": round(self.disconnected_for(), 1), "mqtt_client_id": self.client_id,
                "degraded": self.degraded}

    def _flapping(self) -> bool:
        """The broker keeps dropping the connection right after accepting it (client id taken over)."""
        return self._short_lived >= 2 and (not self.connected
                                           or time.monotonic() - self._connected_at < TAKEOVER_WINDOW_S)

    def _set_backoff(self, first: float, cap: float) -> None:
        # paho restarts its doubling at `first` whenever the bounds are set, so set them only when they change
        if self._client is not None and self._backoff != (first, cap):
            self._backoff = (first, cap)
            self._client.reconnect_delay_set(first, cap)  # type: ignore[arg-type]  # (paho takes float seconds)

    def _report(self, cause: str, needs_fix: bool) -> None:
        """Record a failure: the cause for /healthz; a log line when the cause changes, a reminder every REMIND_S,
        and one line when the outage crosses `degraded_after_s`."""
        self.last_error = cause
        self.failures += 1
        level = logging.ERROR if needs_fix else logging.WARNING
        now = time.monotonic()
        down = self.disconnected_for()
        if cause != self._logged_cause:
            self._logged_cause, self._last_log = cause, now
            log.log(level, "MQTT %s:%d: %s; retrying", self.cfg.host, self.cfg.port, cause)
        elif now - self._last_log >= REMIND_S:
            self._last_log = now
            log.log(level, "MQTT %s:%d: still not connected after %.0f s and %d failure(s): %s; retrying",
                    self.cfg.host, self.cfg.port, down, self.failures, cause)
        if not self._degraded_logged and (down >= self.cfg.degraded_after_s or self._short_lived >= 2):
            self._degraded_logged = True
            why = ("the connection keeps being dropped" if self._short_lived >= 2 else
                   f"no broker for {down:.0f} s (mqtt.degraded_after_s {self.cfg.degraded_after_s:g})")
            log.error("MQTT: agent degraded: %s; scores are not delivered, alerts wait in the spool (%d); cause: %s",
                      why, self.spool.depth, cause)

    # --- setup ------------------------------------------------------------------------------------------------
    def _make_client(self) -> Any:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        cfg = self.cfg
        v5 = cfg.protocol == "5"
        client_id = self.client_id

        class Client(mqtt.Client):  # type: ignore[misc]
            """paho's client, keeping the exception of a failed attempt (paho's on_connect_fail carries none)."""

            connect_error: BaseException | None = None

            def reconnect(self) -> Any:
                self.connect_error = None
                try:
                    return super().reconnect()
                except OSError as e:
                    self.connect_error = e
                    raise

        if v5:
            client = Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        else:
            client = Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                            clean_session=True)
        client.will_set(self.topic("status"), "offline", qos=1, retain=True)
        if cfg.username:
            client.username_pw_set(cfg.username, cfg.password())  # the password is never logged
        if cfg.tls is not None:
            t = cfg.tls
            preflight(cfg)
            try:
                client.tls_set(ca_certs=t.ca_file, certfile=t.cert_file, keyfile=t.key_file,
                               cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            except (ssl.SSLError, OSError, ValueError) as e:
                raise UserError(f"mqtt.tls: cannot load the certificates ({e})") from None
            client.tls_insecure_set(t.insecure)
        self._backoff = (cfg.reconnect_min_s, cfg.reconnect_max_s)
        client.reconnect_delay_set(cfg.reconnect_min_s, cfg.reconnect_max_s)  # type: ignore[arg-type]
        client.max_queued_messages_set(0)
        client.on_pre_connect = self._on_pre_connect
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def start(self) -> None:
        self._client = self._make_client()
        log.info("MQTT: connecting to %s:%d (MQTT %s%s%s, client id %s)", self.cfg.host, self.cfg.port,
                 self.cfg.protocol, ", TLS" if self.cfg.tls else "",
                 f", user {self.cfg.username}" if self.cfg.username else "", self.client_id)
        self.disconnected_since = time.monotonic()
        kwargs: dict[str, Any] = {}
        if self.cfg.protocol == "5":
            kwargs["clean_start"] = True
        self._client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s, **kwargs)
        self._client.loop_start()

    # --- callbacks (paho network thread) ----------------------------------------------------------------------
    def _on_pre_connect(self, client: Any, userdata: Any) -> None:
        self.attempts += 1
        self._connack = False

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        self._short_lived = 0  # a failed attempt between drops: a broker going away, not an id taken over
        cause, needs_fix = describe_connect_error(getattr(client, "connect_error", None), self.cfg.host,
                                                  self.cfg.port, self.cfg.tls is not None)
        self._retry_policy(needs_fix)
        self._report(cause, needs_fix)

    def _retry_policy(self, needs_fix: bool) -> None:
        if needs_fix:
            self._set_backoff(self.cfg.reconnect_min_s, self.cfg.refused_backoff_max_s)
        else:
            self._set_backoff(self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._connack = True
        if reason_code.is_failure:
            self.connected = False
            self.refusals += 1
            self._short_lived = 0
            text = str(reason_code)
            low = text.lower()
            hint, needs_fix = "", True
            if "user name or password" in low or "not authori" in low:
                hint = " (check mqtt.username and the password in mqtt.password_env / mqtt.password_file)"
            elif "identifier" in low:
                hint = f" (client id {self.client_id!r}: check mqtt.client_id)"
            elif "protocol" in low:
                hint = ' (try mqtt.protocol: "3.1.1")' if self.cfg.protocol == "5" else ""
            elif "unavailable" in low or "busy" in low or "quota" in low:
                needs_fix = False
            self._retry_policy(needs_fix)
            self._report(f"broker refused the connection: {text}{hint}", needs_fix)
            return
        now = time.monotonic()
        down = self.disconnected_for()
        self.connected = True
        self.ever_connected = True
        self.connects += 1
        self._connected_at = now
        self.disconnected_since = None
        if self._short_lived == 0:  # a takeover cycle keeps its cause (and stays quiet) until a connection lasts
            if self._logged_cause is not None:
                log.info("MQTT: connected to %s:%d again after %.1f s without the broker (%d failure(s))",
                         self.cfg.host, self.cfg.port, down, self.failures)
            else:
                log.info("MQTT: connected to %s:%d", self.cfg.host, self.cfg.port)
            if self._degraded_logged:
                log.info("MQTT: no longer degraded")
            self.last_error, self._logged_cause, self._degraded_logged, self.failures = None, None, False, 0
        from paho.mqtt.subscribeoptions import SubscribeOptions

        client.subscribe(self.topic("cmd", "#"), qos=1)
        if self.cfg.protocol == "5":  # noLocal: what arrives on our status topic was published by someone else
            client.subscribe(self.topic("status"), options=SubscribeOptions(qos=1, noLocal=True))
        else:
            client.subscribe(self.topic("status"), qos=1)
        client.publish(self.topic("status"), "online", qos=1, retain=True)
        if self.on_connected is not None:
            try:
                self.on_connected()
            except Exception:
                log.exception("MQTT: on_connected hook failed")
        self.pump()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        was = self.connected
        self.connected = False
        if self._stopping:
            return
        now = time.monotonic()
        if not was:
            if not self._connack:  # the TCP/TLS connection was up, then closed without any CONNACK
                self._short_lived = 0
                where = f"{self.cfg.host}:{self.cfg.port}"
                if getattr(reason_code, "value", None) == KEEPALIVE_TIMEOUT:
                    cause = (f"no CONNACK from {where} within {self.cfg.keepalive_s} s (mqtt.keepalive_s): the port "
                             "accepts connections but no MQTT broker answers (wrong port? a proxy in front of a "
                             "stopped broker?)")
                else:
                    hint = ("is this port a TLS listener? then set mqtt.tls" if self.cfg.tls is None
                            else "is it a TLS listener for this CA and client certificate?")
                    cause = f"{where} closed the connection before answering CONNECT ({reason_code}; {hint})"
                self._retry_policy(False)
                self._report(cause, False)
            return  # (after a refused CONNACK the refusal is the cause to report)
        self.disconnected_since = now
        lived = now - self._connected_at
        code = getattr(reason_code, "value", None)
        from_server = bool(getattr(flags, "is_disconnect_packet_from_server", False))
        if code == SESSION_TAKEN_OVER or (code == 128 and not from_server and lived < TAKEOVER_WINDOW_S):
            self._short_lived += 1
        else:
            self._short_lived = 0
        if code == SESSION_TAKEN_OVER:
            cause = (f"the broker handed the client id {self.client_id!r} to another connection (session taken "
                     "over): another client uses the same client id; give each agent its own mqtt.client_id (or "
                     "leave it unset: the default is unique per process)")
        elif self._short_lived >= 2:
            cause = (f"the broker keeps closing the connection right after accepting it (each reconnect succeeds, "
                     f"then is dropped within {TAKEOVER_WINDOW_S:g} s): most likely another client is connected "
                     f"with the same client id {self.client_id!r} and each connection takes it over from the other; "
                     "give each agent its own mqtt.client_id (or leave it unset: the default is unique per process)")
        else:
            cause = f"lost the broker ({reason_code}); alerts are spooled"
        if self._short_lived >= 2:
            # back off: each reconnect would take the id back and throw the other client off again. Kept under half
            # the window, so that both sides of such a tug of war keep seeing short-lived connections.
            first = min(TAKEOVER_WINDOW_S / 2, self.cfg.reconnect_min_s * 2 ** (self._short_lived - 1))
            self._set_backoff(first, first)
        else:
            self._retry_policy(False)
        self._report(cause, self._short_lived >= 2 or code == SESSION_TAKEN_OVER)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        with self._map_lock:
            seq = self._mid_to_seq.pop(mid, None)
            if seq is None:
                self._early_acks.add(mid)  # acked before publish() returned (or not a spooled message)
                if len(self._early_acks) > 10000:
                    self._early_acks.clear()
                return
        self._ack(seq, reason_code)

    def _ack(self, seq: int, reason_code: Any) -> None:
        if getattr(reason_code, "is_failure", False):
            # The broker refused it for good (e.g. not authorised on the topic): retrying cannot help.
            self.alerts_rejected += 1
            log.error("MQTT: broker rejected spooled message %d (%s); deleting it", seq, reason_code)
        else:
            self.alerts_acked += 1
        self.spool.ack(seq)
        self.pump()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        parts = msg.topic.split("/")
        base = self.base.split("/")
        if parts[: len(base)] != base:
            return
        rest = parts[len(base):]
        if rest == ["status"]:
            self._on_status_message(msg)
            return
        if not rest or rest[0] != "cmd":
            return
        props = getattr(msg, "properties", None)
        if len(rest) != 3:  # cmd, cmd/<x>, cmd/<a>/<b>/<c>...: answered on the same levels under state/
            body = {"ok": False, "error": f"topic {msg.topic!r}: commands are {self.base}/cmd/<camera>/<command>"}
            self.reply(rest[1] if len(rest) > 1 else "", "/".join(rest[2:]), body, props, levels=rest[1:])
            return
        camera, command = rest[1], rest[2]
        try:
            reply = self.on_command(camera, command, msg.payload) if self.on_command else None
        except Exception as e:
            log.exception("command %s/%s failed", camera, command)
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        if reply is not None:
            self.reply(camera, command, reply, props)

    def _on_status_message(self, msg: Any) -> None:
        """Our own status topic. A live `offline` while we are connected is the last will of an earlier run of this
        agent that died (its connection timed out after ours began): say `online` again. A live `online` (MQTT 5
        only, where noLocal hides our own) comes from a second agent with the same agent_id."""
        if msg.retain or self._stopping or not self.connected:
            return
        payload = bytes(msg.payload)
        if payload == b"offline":
            log.info("MQTT: another client set %s offline (the late last will of an earlier run of this agent, or "
                     "a second agent with this agent_id stopping); online again", msg.topic)
            self.publish(self.topic("status"), "online", qos=1, retain=True)
        elif payload == b"online" and self.cfg.protocol == "5":
            self.duplicate_agent_seen += 1
            now = time.monotonic()
            if now - self._last_dup_log >= REMIND_S:
                self._last_dup_log = now
                log.warning("MQTT: another client published 'online' on %s: a second agent with agent_id %r is "
                            "using this broker and prefix; their topics mix (give each agent its own agent_id)",
                            msg.topic, self.agent_id)

    # --- publishing -------------------------------------------------------------------------------------------
    def reply(self, camera: str, command: str, body: dict[str, Any], request_props: Any = None,
              levels: list[str] | None = None) -> None:
        """Answer a command on state/<camera>/<command> (or on state/<levels...> for a malformed command topic), and
        on an MQTT 5 response topic if the request had one."""
        from .decide import iso

        body = {"command": command, "camera": camera, "time": iso(time.time()), **body}
        payload = json.dumps(body).encode()
        self.publish(self.topic("state", *(levels if levels is not None else (camera, command))), payload, qos=1)
        rt = getattr(request_props, "ResponseTopic", None) if request_props is not None else None
        if rt and self.cfg.protocol == "5":
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            p = Properties(PacketTypes.PUBLISH)
            cd = getattr(request_props, "CorrelationData", None)
            if cd:
                p.CorrelationData = cd
            self.publish(rt, payload, qos=1, properties=p)

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False,
                properties: Any = None) -> bool:
        """Best-effort publish (scores, heatmaps, stats, statuses): skipped while disconnected."""
        if not self.connected or self._client is None:
            return False
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc != 0:
            self.publish_failures += 1
            return False
        return True

    def publish_durable(self, topic: str, payload: bytes) -> bool:
        """Alert path: spool first (durable), then deliver in order. False only if the spool refused it."""
        msg = self.spool.put(topic, payload, qos=1)
        self.pump()
        return msg is not None

    def pump(self) -> None:
        """Hand spooled messages to paho, oldest first, up to `spool.inflight` awaiting PUBACK."""
        if self._client is None or not self.connected:
            return
        if not self._pump_lock.acquire(blocking=False):
            return  # another thread is pumping; it loops until the window is full
        try:
            while self.connected and self.spool.inflight < self.cfg.spool.inflight:
                m = self.spool.next_unsent()
                if m is None:
                    break
                info = self._client.publish(m.topic, m.payload, qos=m.qos, retain=m.retain)
                if info.rc not in (0, 4):  # 4 = MQTT_ERR_NO_CONN: paho keeps QoS 1 messages and sends on reconnect
                    self.spool.unhand(m.seq)
                    self.publish_failures += 1
                    break
                with self._map_lock:
                    if info.mid in self._early_acks:
                        self._early_acks.discard(info.mid)
                        early = True
                    else:
                        self._mid_to_seq[info.mid] = m.seq
                        early = False
                if early:
                    self._ack(m.seq, None)
        finally:
            self._pump_lock.release()

    # --- shutdown ---------------------------------------------------------------------------------------------
    def flush(self, timeout_s: float) -> bool:
        """Wait until the spool is empty (True) or the time is up."""
        end = time.monotonic() + timeout_s
        while self.spool.depth and time.monotonic() < end:
            self.pump()
            time.sleep(0.05)
        return self.spool.depth == 0

    def stop(self, flush_s: float | None = None) -> None:
        """Deliver what can be delivered, publish `offline`, disconnect. What stays in the spool is replayed later."""
        if self._client is None:
            return
        flush_s = self.cfg.shutdown_flush_s if flush_s is None else flush_s
        if self.connected and not self.flush(flush_s):
            log.warning("MQTT: %d alert message(s) left in the spool %s; they are sent at the next start",
                        self.spool.depth, self.spool.dir)
        self._stopping = True
        if self.connected:
            info = self._client.publish(self.topic("status"), "offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=min(3.0, max(flush_s, 0.5)))
            except (RuntimeError, ValueError):
                pass
        self._client.disconnect()
        self._client.loop_stop()
        self._client = None
        self.connected = False
