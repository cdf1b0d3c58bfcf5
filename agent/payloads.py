"""The JSON payloads the agent publishes over MQTT and their versioned JSON Schemas (agent/schemas/, draft 2020-12).

    topic (under <prefix>/<agent_id>/)      schema                      emitted by
    <camera>/score                          score.schema.json           agent.loop (Agent._decide_publish)
    <camera>/alert                          alert.schema.json           agent.decide (AlertTracker), agent.loop
    stats                                   stats.schema.json           agent.loop (Agent.stats)
    <camera>/status/detail                  status-detail.schema.json   agent.loop (Agent._publish_camera_status)
    state/<camera>/<command> (and deeper)   command-reply.schema.json   agent.mqtt (MqttLink.reply), agent.loop

`status` and `<camera>/status` carry one plain word, `<camera>/heatmap` and `<camera>/snapshot` JPEG bytes; they
have no JSON Schema. Each schema's `$id` (`urn:mae-ad:mqtt:<name>:<version>`) and `x-schema-version` carry
MQTT_SCHEMA_VERSION; a change that breaks a consumer (a field removed, renamed or retyped) bumps it. Described for
people in docs/mqtt.md. Nothing here validates at run time (the tests do, with the jsonschema package).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

MQTT_SCHEMA_VERSION = 1
SCHEMAS = ("score", "alert", "stats", "status-detail", "command-reply")


def schema_file(name: str) -> str:
    """The package-relative file name of a schema (`agent/schemas/<name>.schema.json`)."""
    if name not in SCHEMAS:
        raise KeyError(f"no MQTT payload schema {name!r}; there are {', '.join(SCHEMAS)}")
    return f"{name}.schema.json"


def load_schema(name: str) -> dict[str, Any]:
    """A payload schema as a dict (read from the installed package's data)."""
    text = resources.files("agent").joinpath("schemas").joinpath(schema_file(name)).read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def schema_for_topic(sub: str) -> str | None:
    """The schema of a topic below `<prefix>/<agent_id>/` the agent publishes on; None for its plain-text and JPEG
    topics and for the commands it receives. Camera names cannot be `cmd`, `state`, `stats` or `status`."""
    parts = sub.split("/")
    if parts[0] == "state":
        return "command-reply"
    if parts == ["stats"]:
        return "stats"
    if len(parts) == 2 and parts[1] in ("score", "alert"):
        return parts[1]
    if len(parts) == 3 and parts[1:] == ["status", "detail"]:
        return "status-detail"
    return None
