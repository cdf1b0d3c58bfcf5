"""The versioned JSON Schemas of the agent's MQTT payloads (agent/schemas, agent.payloads, docs/mqtt.md): valid
schemas, found as package data, strict enough to refuse a wrong payload, and matched by what the agent publishes
(here and, through the recorder, in every broker test)."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest

from tests.agent.conftest import AgentThread, agent_cfg

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[2]

SCORE = {"time": "2026-11-22T07:43:42.626Z", "ts": 1795333422.626, "camera": "press", "frame_id": 0,
         "score": 0.117647, "threshold": 0.17, "anomalous": False,
         "latency_ms": {"capture": 1.478, "preprocess": 0.532, "engine": 1.986, "decide": 0.029},
         "model_id": "brightness-64"}


def _validator(name: str):
    from agent.payloads import load_schema

    return jsonschema.Draft202012Validator(load_schema(name))


def _errors(name: str, payload: dict) -> list[str]:
    return [f"{e.json_path}: {e.message}" for e in _validator(name).iter_errors(payload)]


def test_every_schema_is_valid_versioned_and_package_data():
    import tomllib

    from agent.payloads import MQTT_SCHEMA_VERSION, SCHEMAS, load_schema, schema_file

    for name in SCHEMAS:
        s = load_schema(name)
        jsonschema.Draft202012Validator.check_schema(s)
        assert s["$id"] == f"urn:mae-ad:mqtt:{name}:{MQTT_SCHEMA_VERSION}" and s["x-schema-version"] == 1
        assert (ROOT / "agent" / "schemas" / schema_file(name)).is_file()
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["agent"]
    assert "schemas/*.json" in data
    doc = (ROOT / "docs" / "mqtt.md").read_text()
    assert all(schema_file(n) in doc for n in SCHEMAS)
    assert "docs/mqtt.md" in (ROOT / "README.md").read_text()
    with pytest.raises(KeyError, match="no MQTT payload schema"):
        schema_file("heatmap")


@pytest.mark.parametrize(("sub", "name"), [
    ("press/score", "score"), ("press/alert", "alert"), ("stats", "stats"), ("press/status/detail", "status-detail"),
    ("state/press/threshold", "command-reply"), ("state/press", "command-reply"), ("state/a/b/c", "command-reply"),
    ("status", None), ("press/status", None), ("press/heatmap", None), ("press/snapshot", None),
    ("cmd/press/pause", None),
])
def test_each_topic_has_its_schema(sub, name):
    from agent.payloads import schema_for_topic

    assert schema_for_topic(sub) == name


def test_a_wrong_payload_is_refused():
    assert _errors("score", SCORE) == []
    assert _errors("score", {**SCORE, "box": [1, 2, 3, 4]}) == []
    missing = {k: v for k, v in SCORE.items() if k != "model_id"}
    assert any("model_id" in e for e in _errors("score", missing))
    assert _errors("score", {**SCORE, "frame_id": "0"}) != []
    assert _errors("score", {**SCORE, "extra": 1}) != []  # a new field is a schema change, not drift
    assert _errors("score", {**SCORE, "box": [1, 2, 3]}) != []
    assert _errors("score", {**SCORE, "time": "yesterday"}) != []
    reply = {"command": "threshold", "camera": "press", "time": "2026-11-22T07:43:45.118Z", "ok": True,
             "cameras": {"press": {"paused": False, "threshold": 0.2, "threshold_source": "command",
                                   "status": "streaming"}}}
    assert _errors("command-reply", reply) == []
    assert _errors("command-reply", {**reply, "ok": False}) != []  # a refusal says why
    assert _errors("command-reply", {**reply, "command": "snapshot"}) != []  # a snapshot answer names its frame
    bad = copy.deepcopy(reply)
    bad["cameras"]["press"]["threshold_source"] = "guess"
    assert _errors("command-reply", bad) != []


def test_alert_events_of_the_real_tracker_match_the_schema():
    from agent.decide import AlertTracker

    tr = AlertTracker("press", open_after=2, close_after=2, update_interval_s=0.0, id_factory=lambda: "a1")
    events = []
    for i, s in enumerate([0.5, 0.6, 0.9, 0.1, 0.1, 0.7, 0.8]):
        events += tr.update(s, 0.3 if i < 3 else 0.6, i, 1000.0 + i, [1, 2, 3, 4] if s > 0.3 else None).events
    events.append(tr.lose("camera_lost"))
    events[-1].update(camera_status="reconnecting", camera_reason="read timeout")
    assert [e["event"] for e in events] == ["start", "update", "end", "start", "end"]
    for e in events:
        e["model_id"] = "m"
        assert _errors("alert", e) == [], e
    assert _errors("alert", {**events[2], "score": 0.1}) != []  # an end event has no frame score
    assert _errors("alert", {**events[0], "reason": "normal"}) != []
    assert _errors("alert", {**events[0], "event": "stop"}) != []


@pytest.mark.broker
def test_every_payload_the_agent_publishes_matches_its_schema(tmp_path, broker, recorder, video):
    """One run that publishes every kind of JSON payload: scores, alerts (start/end), stats, status details,
    command answers (ok, refused, snapshot, malformed topic); all are checked against their schemas."""
    cfg = agent_cfg(tmp_path, broker.port, [{"name": "cam", "source": video["path"], "loop": True}])
    at = AgentThread(cfg).start()
    base = "mae-ad/t"
    try:
        assert recorder.wait_for(lambda: any(e["event"] == "end" for e in recorder.json("alert")), 30)
        assert recorder.wait_for(lambda: recorder.json("stats"), 10)
        for topic, payload in (("cam/threshold", "0.5"), ("cam/threshold", "abc"), ("nope/pause", ""),
                               ("cam/snapshot", ""), ("cam/threshold/x", "1"), ("cam", "")):
            n = len(recorder.messages)
            recorder.publish(f"{base}/cmd/{topic}", payload)
            assert recorder.wait_for(lambda n=n: any("/state/" in t for t, _, _ in recorder.messages[n:]), 10), topic
        assert recorder.wait_for(lambda: recorder.json("snapshot", state=True), 10)
    finally:
        at.stop()
    time.sleep(0.5)  # the offline status details
    seen = recorder.check_payloads()
    assert set(seen) == {"score", "alert", "stats", "status-detail", "command-reply"}, seen
    assert seen["command-reply"] >= 6
    details = [json.loads(p) for t, p, _ in recorder.messages if t.endswith("/status/detail")]
    assert {d["status"] for d in details} >= {"streaming", "offline"}
