"""Broker faults against a real mosquitto: every connection failure is named (log and /healthz), the agent reports
itself degraded, the default client id is unique per process, scores flow again soon after the broker returns,
a late last will cannot leave a running agent `offline`, and commands are checked before they act."""

from __future__ import annotations

import json
import logging
import socket
import time
import urllib.request

import pytest

from agent.broker import free_port
from agent.config import MqttSection
from tests.agent.conftest import AgentThread, Recorder, _openssl, agent_cfg, wait_until

pytestmark = pytest.mark.broker

DEFAULT_RETRY = {k: MqttSection.model_fields[k].default for k in ("reconnect_min_s", "reconnect_max_s")}


def _mqtt_lines(caplog, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "agent.mqtt" and needle in r.getMessage()]


def _healthz(at: AgentThread) -> dict:
    assert wait_until(lambda: at.agent.health_server is not None, 5)
    port = at.agent.health_server.port
    return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).read())


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory) -> str:
    """A CA that did not sign the broker's certificate."""
    d = tmp_path_factory.mktemp("other-ca")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=some other CA", cwd=d)
    return str(d / "ca.crt")


@pytest.fixture
def silent_listener():
    """A port that accepts TCP connections and never says a word (a proxy in front of a stopped broker)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    yield srv.getsockname()[1]
    srv.close()


@pytest.mark.parametrize("case", ["unresolvable", "refused_port", "untrusted_ca", "tls_to_plain_port",
                                  "plain_to_tls_port", "silent_listener"])
def test_each_connection_failure_is_named_once_in_the_log_and_in_healthz(tmp_path, broker, other_ca, caplog, case,
                                                                         silent_listener):
    caplog.set_level(logging.INFO)
    free = free_port()  # nothing listens there
    host, port, tls, expect = {
        "unresolvable": ("broker.invalid", 1883, None, "cannot resolve the broker host 'broker.invalid'"),
        "refused_port": ("127.0.0.1", free, None, f"connection to 127.0.0.1:{free} refused"),
        "untrusted_ca": ("127.0.0.1", broker.ports["tls"], {"ca_file": other_ca}, "certificate"),
        "tls_to_plain_port": ("127.0.0.1", broker.port, {"ca_file": other_ca}, "TLS listener"),
        "plain_to_tls_port": ("127.0.0.1", broker.ports["tls"], None, "closed the connection before answering"),
        "silent_listener": ("127.0.0.1", silent_listener, None, "no MQTT broker answers"),
    }[case]
    need = 2 if case == "silent_listener" else 4  # (each silent attempt waits out keepalive_s, 5 s)
    cfg = agent_cfg(tmp_path, port, [{"name": "c", "source": str(tmp_path / "missing.avi")}],
                    mqtt={"host": host, "port": port, "tls": tls, "degraded_after_s": 1.0, **DEFAULT_RETRY},
                    health={"enabled": True, "port": 0})
    at = AgentThread(cfg).start()
    try:
        assert wait_until(lambda: at.agent.link is not None and at.agent.link.failures >= need, 20), case
        health = _healthz(at)
        port = at.agent.health_server.port
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        at.stop()
    assert health["mqtt_connected"] is False and expect in (health["mqtt_error"] or ""), health
    assert health["degraded"] is True and health["mqtt_disconnected_s"] >= 1.0
    assert health["ok"] is True  # the agent itself runs (and spools); degraded is the signal
    assert "maead_degraded 1" in metrics and "maead_mqtt_connected 0" in metrics
    # rate-limited: one line for the cause however many attempts failed, and one line saying 'degraded'
    assert len(_mqtt_lines(caplog, expect)) == 2, _mqtt_lines(caplog, "MQTT")  # the failure line + degraded line
    assert len(_mqtt_lines(caplog, "agent degraded")) == 1


def test_refused_password_backs_off_and_the_cause_is_logged_once(tmp_path, broker, caplog, monkeypatch):
    from tests.agent.conftest import USER

    caplog.set_level(logging.INFO)
    monkeypatch.setenv("T_PW", "wrong-pass")
    port = broker.ports["password"]
    cfg = agent_cfg(tmp_path, port, [{"name": "c", "source": str(tmp_path / "missing.avi")}],
                    mqtt={"port": port, "username": USER, "password_env": "T_PW", **DEFAULT_RETRY,
                          "refused_backoff_max_s": 30.0})
    at = AgentThread(cfg).start()
    try:
        assert wait_until(lambda: at.agent.link is not None and at.agent.link.refusals >= 3, 15)
        time.sleep(3.0)
        attempts_in_3s = at.agent.link.refusals
    finally:
        at.stop()
    # delays 0.5, 1, 2, 4 ...: not the 1 s cap used while the broker cannot be reached
    assert attempts_in_3s <= 5
    assert len(_mqtt_lines(caplog, "check mqtt.username")) == 1
    assert "wrong-pass" not in caplog.text


def test_default_client_ids_do_not_collide_and_a_shared_explicit_one_is_named(tmp_path, broker, caplog):
    caplog.set_level(logging.INFO)
    cams = [{"name": "c", "source": str(tmp_path / "missing.avi")}]
    # the same config twice (same agent_id): default client ids are unique per process, both stay connected
    a = AgentThread(agent_cfg(tmp_path / "a", broker.port, cams)).start()
    b = AgentThread(agent_cfg(tmp_path / "b", broker.port, cams)).start()
    try:
        assert wait_until(lambda: a.agent.link is not None and b.agent.link is not None
                          and a.agent.link.connected and b.agent.link.connected, 10)
        time.sleep(3.0)
        assert a.agent.link.connects == 1 and b.agent.link.connects == 1
        assert a.agent.link.client_id != b.agent.link.client_id
        assert a.agent.link.client_id.startswith("mae-ad-t-")
        # one of them saw the other announce itself on the same status topic
        assert a.agent.link.duplicate_agent_seen + b.agent.link.duplicate_agent_seen >= 1
    finally:
        a.stop()
        b.stop()
    assert _mqtt_lines(caplog, "a second agent with agent_id 't'")

    # an explicit client id is used as given; two agents sharing it throw each other off: the cause is named
    caplog.clear()
    fixed = {"client_id": "shared-id", **DEFAULT_RETRY}
    a = AgentThread(agent_cfg(tmp_path / "c", broker.port, cams, mqtt=fixed)).start()
    assert wait_until(lambda: a.agent.link is not None and a.agent.link.connected, 10)
    b = AgentThread(agent_cfg(tmp_path / "d", broker.port, cams, mqtt=fixed)).start()
    try:
        assert wait_until(lambda: any("same client id 'shared-id'" in (x.agent.link.error() or "")
                                      for x in (a, b) if x.agent.link is not None), 20)
        victim = a if "same client id" in (a.agent.link.error() or "") else b
        assert victim.agent.link.degraded and victim.agent.health()[1]["degraded"] is True
    finally:
        a.stop()
        b.stop()
    assert a.agent.link.client_id == "shared-id"
    named = _mqtt_lines(caplog, "same client id 'shared-id'")
    assert 1 <= len(named) <= 2  # once per agent, not once per reconnect


def test_scores_flow_again_within_2s_of_the_broker_returning(tmp_path, broker, video):
    """The broker stops (SIGTERM) for 8.5 s and comes back on the same port; with the default retry settings the first
    score after its return arrives within 2 s, and the agent tried at most about once a second while it was down."""
    cfg = agent_cfg(tmp_path, broker.port, [{"name": "cam", "source": video["path"], "loop": True}],
                    mqtt={**DEFAULT_RETRY})
    rec = Recorder(broker.port).start()
    at = AgentThread(cfg).start()
    try:
        assert rec.wait_for(lambda: len(rec.json("score")) > 3, 20)
        rec.stop()
        broker.stop()
        assert wait_until(lambda: not at.agent.link.connected, 5)
        attempts0 = at.agent.link.attempts
        time.sleep(8.5)  # with the old doubling back-off (1, 2, 4, 8 s) the next try would come at ~15 s
        attempts_down = at.agent.link.attempts - attempts0
        broker.start()
        t_up = time.monotonic()
        rec = Recorder(broker.port).start()
        assert rec.wait_for(lambda: len(rec.json("score")) > 0, 10)
        gap = time.monotonic() - t_up
    finally:
        at.stop()
        rec.stop()
    print(f"first score {gap:.2f} s after the broker returned; {attempts_down} attempts in the 8.5 s outage")
    assert gap <= 2.0
    assert 4 <= attempts_down <= 12  # kept trying, about once a second, no faster


def test_a_late_last_will_does_not_leave_a_running_agent_offline(tmp_path, broker, recorder, video):
    """An earlier run of the agent hangs with its connection half-open (power cut, network gone) and the agent is
    started again: the earlier run's will `offline`, published when its keepalive runs out after the new run said
    `online`, is answered with `online` again."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    ghost = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="mae-ad-t-earlier-run", protocol=mqtt.MQTTv5)
    ghost.will_set("mae-ad/t/status", "offline", qos=1, retain=True)
    ghost.connect("127.0.0.1", broker.port, keepalive=3)
    ghost.loop_start()
    ghost.publish("mae-ad/t/status", "online", qos=1, retain=True).wait_for_publish(5)
    ghost.loop_stop()  # hangs: the socket stays open, no more pings; the broker gives up after 1.5 x 3 s
    cfg = agent_cfg(tmp_path, broker.port, [{"name": "cam", "source": video["path"], "loop": True}])
    at = AgentThread(cfg).start()
    try:
        assert wait_until(lambda: at.agent.link is not None and at.agent.link.connected, 10)
        n = len(recorder.payloads("status"))
        assert recorder.wait_for(lambda: b"offline" in recorder.payloads("status")[n:], 15)  # the ghost's will
        assert recorder.wait_for(lambda: recorder.payloads("status")[-1] == b"online", 5)
        time.sleep(0.5)
        assert recorder.payloads("status")[-1] == b"online"
    finally:
        at.stop()
        ghost.socket().close() if ghost.socket() else None


def test_command_values_are_checked_and_every_command_topic_is_answered(tmp_path, broker, recorder, video):
    cfg = agent_cfg(tmp_path, broker.port, [{"name": "cam", "source": video["path"], "loop": True}])
    at = AgentThread(cfg).start()
    base = "mae-ad/t"

    def ask(topic: str, payload: str, reply_suffix: str) -> dict:
        n = len(recorder.json(reply_suffix, state=True))
        recorder.publish(f"{base}/cmd/{topic}", payload)
        assert recorder.wait_for(lambda: len(recorder.json(reply_suffix, state=True)) > n, 10), topic
        return recorder.json(reply_suffix, state=True)[-1]

    try:
        assert recorder.wait_for(lambda: len(recorder.json("score")) > 0, 15)
        # the brightness model's threshold is 0.17: commands may set 0.017 .. 1.7
        for bad in ("-1", "0", "1e300", "1e400", "NaN", "true", '{"value": true}', '{"value": 0.5, "x": 1}',
                    '"0.5"', "[0.5]", "abc", "0.001", "2"):
            r = ask("cam/threshold", bad, "threshold")
            assert r["ok"] is False and r["error"].startswith("threshold:"), (bad, r)
            assert r["cameras"]["cam"]["threshold"] == pytest.approx(0.17), bad
            assert r["cameras"]["cam"]["threshold_source"] == "model", bad
        assert "outside [0.017, 1.7]" in ask("cam/threshold", "1e300", "threshold")["error"]
        r = ask("all/threshold", '{"value": 0.5}', "threshold")
        assert r["ok"] is True and r["cameras"]["cam"]["threshold"] == 0.5
        assert ask("cam/threshold", "reset", "threshold")["cameras"]["cam"]["threshold_source"] == "model"

        r = ask("cam/pause", "false", "pause")  # not a way to resume: refused, nothing changes
        assert r["ok"] is False and "takes no value" in r["error"] and r["cameras"]["cam"]["paused"] is False
        assert ask("cam/pause", "", "pause")["ok"] is True
        assert ask("cam/resume", "{}", "resume")["cameras"]["cam"]["paused"] is False

        # topics deeper or shallower than cmd/<camera>/<command> are answered on the same levels under state/
        r = ask("cam/threshold/x", "0.5", "x")
        assert r["ok"] is False and "cmd/<camera>/<command>" in r["error"]
        assert any(t == f"{base}/state/cam/threshold/x" for t, _, _ in recorder.messages)
        r = ask("cam", "0.5", "cam")
        assert r["ok"] is False and any(t == f"{base}/state/cam" for t, _, _ in recorder.messages)
        r = ask("cam/frobnicate", "", "frobnicate")
        assert r["ok"] is False and "unknown command" in r["error"]
    finally:
        at.stop()
