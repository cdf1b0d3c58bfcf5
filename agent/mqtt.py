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
  state/<camera>/<command> the answer to each command (JSON)

Delivery of alerts: the message is first written to the spool, then handed to paho (at most `spool.inflight`
at a time, in order); paho keeps a QoS 1 message until its PUBACK, across reconnects; the PUBACK deletes the
spool file. Messages not handed over yet wait in the spool, so an outage or a restart loses nothing.
"""

from __future__ import annotations

import json
import logging
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


class MqttLink:
    def __init__(self, cfg: MqttSection, agent_id: str, spool: Spool, on_command: CommandHandler | None = None,
                 on_connected: Callable[[], None] | None = None):
        self.cfg = cfg
        self.agent_id = agent_id
        self.base = f"{cfg.prefix}/{agent_id}"
        self.spool = spool
        self.on_command = on_command
        self.on_connected = on_connected
        self.connected = False
        self.ever_connected = False
        self.last_error: str | None = None
        self.connects = 0
        self.refusals = 0  # CONNACKs with a failure reason (bad credentials, not authorised)
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

    # --- setup ------------------------------------------------------------------------------------------------
    def _make_client(self) -> Any:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        cfg = self.cfg
        v5 = cfg.protocol == "5"
        client_id = cfg.client_id or f"mae-ad-{self.agent_id}"
        if v5:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        else:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                                 clean_session=True)
        client.will_set(self.topic("status"), "offline", qos=1, retain=True)
        if cfg.username:
            client.username_pw_set(cfg.username, cfg.password())  # the password is never logged
        if cfg.tls is not None:
            t = cfg.tls
            for key, path in (("ca_file", t.ca_file), ("cert_file", t.cert_file), ("key_file", t.key_file)):
                if path and not Path(path).is_file():
                    raise UserError(f"mqtt.tls.{key}: {path} not found")
            if bool(t.cert_file) != bool(t.key_file):
                raise UserError("mqtt.tls.cert_file and mqtt.tls.key_file: set both for a client certificate")
            try:
                client.tls_set(ca_certs=t.ca_file, certfile=t.cert_file, keyfile=t.key_file,
                               cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            except (ssl.SSLError, OSError, ValueError) as e:
                raise UserError(f"mqtt.tls: cannot load the certificates ({e})") from None
            client.tls_insecure_set(t.insecure)
        client.reconnect_delay_set(cfg.reconnect_min_s, cfg.reconnect_max_s)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def start(self) -> None:
        self._client = self._make_client()
        log.info("MQTT: connecting to %s:%d (MQTT %s%s%s)", self.cfg.host, self.cfg.port, self.cfg.protocol,
                 ", TLS" if self.cfg.tls else "", f", user {self.cfg.username}" if self.cfg.username else "")
        kwargs: dict[str, Any] = {}
        if self.cfg.protocol == "5":
            kwargs["clean_start"] = True
        self._client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s, **kwargs)
        self._client.loop_start()

    # --- callbacks (paho network thread) ----------------------------------------------------------------------
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self.connected = False
            self.refusals += 1
            self.last_error = f"broker refused the connection: {reason_code}"
            hint = ""
            if "user name or password" in str(reason_code).lower() or "not authori" in str(reason_code).lower():
                hint = " (check mqtt.username and the password in mqtt.password_env / mqtt.password_file)"
            log.error("MQTT %s:%d: %s%s; retrying", self.cfg.host, self.cfg.port, self.last_error, hint)
            return
        self.connected = True
        self.ever_connected = True
        self.connects += 1
        self.last_error = None
        log.info("MQTT: connected to %s:%d", self.cfg.host, self.cfg.port)
        client.subscribe(self.topic("cmd", "#"), qos=1)
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
        if not self._stopping and was:  # (after a refused CONNACK, keep the refusal as the error to report)
            self.last_error = f"disconnected: {reason_code}"
            if was:
                log.warning("MQTT: lost the broker (%s); reconnecting, alerts are spooled", reason_code)

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
        if len(parts) != len(base) + 3 or parts[: len(base)] != base or parts[len(base)] != "cmd":
            return
        camera, command = parts[-2], parts[-1]
        try:
            reply = self.on_command(camera, command, msg.payload) if self.on_command else None
        except Exception as e:
            log.exception("command %s/%s failed", camera, command)
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        props = getattr(msg, "properties", None)
        if reply is not None:
            self.reply(camera, command, reply, props)

    # --- publishing -------------------------------------------------------------------------------------------
    def reply(self, camera: str, command: str, body: dict[str, Any], request_props: Any = None) -> None:
        """Answer a command on state/<camera>/<command> (and on an MQTT 5 response topic, if the request had one)."""
        from .decide import iso

        body = {"command": command, "camera": camera, "time": iso(time.time()), **body}
        payload = json.dumps(body).encode()
        self.publish(self.topic("state", camera, command), payload, qos=1)
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
