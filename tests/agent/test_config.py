"""Agent configuration: typed, forbids unknown keys (naming file and key), overrides, secrets, CLI errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mae_ad.contract import UserError

MINIMAL = {"model": {"backend": "onnxruntime", "path": "m.onnx"}, "cameras": [{"name": "a", "source": "v.avi"}]}


def write(tmp_path: Path, data: dict, name: str = "agent.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_minimal_config_defaults(tmp_path):
    from agent.config import dump_agent_config, load_agent_config

    cfg = load_agent_config(write(tmp_path, MINIMAL))
    assert cfg.mqtt.protocol == "5" and cfg.mqtt.spool.on_full == "drop_oldest"
    assert cfg.cameras[0].resolved_kind() == "file"
    again = yaml.safe_load(dump_agent_config(cfg))
    assert again["cameras"][0]["name"] == "a" and again["alerts"]["open_after"] == 3


def test_unknown_key_names_file_and_key(tmp_path):
    from agent.config import load_agent_config

    bad = {**MINIMAL, "cameras": [{"name": "a", "source": "v.avi", "trheshold": 0.3}]}
    p = write(tmp_path, bad)
    with pytest.raises(UserError) as e:
        load_agent_config(p)
    msg = str(e.value)
    assert str(p) in msg and "cameras.0.trheshold: unknown key" in msg


def test_password_in_yaml_is_refused(tmp_path):
    from agent.config import load_agent_config

    p = write(tmp_path, {**MINIMAL, "mqtt": {"username": "u", "password": "hunter2"}})
    with pytest.raises(UserError) as e:
        load_agent_config(p)
    assert "mqtt.password: unknown key" in str(e.value) and "hunter2" not in str(e.value)


def test_overrides_reach_sections_and_camera_list(tmp_path):
    from agent.config import load_agent_config

    cfg = load_agent_config(write(tmp_path, MINIMAL),
                            ["mqtt.port=1884", "cameras.0.threshold=0.42", "cameras.0.roi={x: 1, y: 2, width: 3, height: 4}"])
    assert cfg.mqtt.port == 1884 and cfg.cameras[0].threshold == 0.42 and cfg.cameras[0].roi.width == 3
    with pytest.raises(UserError, match="cameras.5"):
        load_agent_config(write(tmp_path, MINIMAL), ["cameras.5.threshold=1"])
    with pytest.raises(UserError, match=r"mqtt.port"):
        load_agent_config(write(tmp_path, MINIMAL), ["mqtt.port=99999"])


@pytest.mark.parametrize("source,kind", [(0, "device"), ("2", "device"), ("rtsp://u:p@cam/s", "url"),
                                         ("http://cam/mjpg", "url"), ("v4l2src ! videoconvert ! appsink", "gstreamer"),
                                         ("clip.mp4", "file")])
def test_source_kind_guess(source, kind):
    from agent.config import CameraSection

    assert CameraSection(name="c", source=source).resolved_kind() == kind


def test_duplicate_and_bad_camera_names(tmp_path):
    from agent.config import load_agent_config

    two = {**MINIMAL, "cameras": [{"name": "a", "source": "x"}, {"name": "a", "source": "y"}]}
    with pytest.raises(UserError, match="cameras.1.name: duplicate"):
        load_agent_config(write(tmp_path, two))
    slash = {**MINIMAL, "cameras": [{"name": "a/b", "source": "x"}]}
    with pytest.raises(UserError, match="cameras.0.name"):
        load_agent_config(write(tmp_path, slash))


def test_password_from_env_or_file(tmp_path, monkeypatch):
    from agent.config import load_agent_config

    cfg = load_agent_config(write(tmp_path, {**MINIMAL, "mqtt": {"username": "u", "password_env": "T_MQTT_PW"}}))
    monkeypatch.delenv("T_MQTT_PW", raising=False)
    with pytest.raises(UserError, match="T_MQTT_PW is not set"):
        cfg.mqtt.password()
    monkeypatch.setenv("T_MQTT_PW", "s3cret")
    assert cfg.mqtt.password() == "s3cret"
    pw = tmp_path / "pw"
    pw.write_text("from-file\n")
    cfg2 = load_agent_config(write(tmp_path, {**MINIMAL, "mqtt": {"username": "u", "password_file": str(pw)}}))
    assert cfg2.mqtt.password() == "from-file"
    with pytest.raises(UserError, match="username: required"):
        load_agent_config(write(tmp_path, {**MINIMAL, "mqtt": {"password_env": "X"}}))


def test_model_path_required_for_real_engines(tmp_path):
    from agent.config import load_agent_config

    with pytest.raises(UserError, match="model: .*path: required"):
        load_agent_config(write(tmp_path, {**MINIMAL, "model": {"backend": "tensorrt"}}))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("mae-ad")
    cmd = [str(exe), *args] if exe.exists() else [sys.executable, "-m", "app.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_cli_bad_config_names_the_key(tmp_path):
    bad = write(tmp_path, {**MINIMAL, "mqtt": {"prot": "5"}})
    for args in (("validate-config", str(bad)), ("run", "--config", str(bad))):
        r = _cli(*args)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("error: ") and "mqtt.prot: unknown key" in r.stderr and str(bad) in r.stderr
        assert "Traceback" not in r.stderr
    ok = _cli("validate-config", str(write(tmp_path, MINIMAL, "ok.yaml")))
    assert ok.returncode == 0 and "cameras:" in ok.stdout


def test_cli_missing_model_is_one_line_error(tmp_path):
    cfg = write(tmp_path, {**MINIMAL, "model": {"backend": "onnxruntime", "path": str(tmp_path / "nope.onnx")},
                           "mqtt": {"spool": {"dir": str(tmp_path / "sp")}}})
    r = _cli("run", "--config", str(cfg), "--duration", "1")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "nope.onnx" in r.stderr and "Traceback" not in r.stderr


def test_docs_key_table_lists_every_config_key():
    """docs/agent.md's key table names every key of every agent config section (a key added to the schema but not
    to the table fails here)."""
    import re

    from agent import config as C

    text = (Path(__file__).resolve().parents[2] / "docs" / "agent.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([a-z_\[\]]+)` \| (.*) \|$", text, re.M)}
    sections = {"model": C.ModelSection, "cameras[]": C.CameraSection, "capture": C.CaptureSection,
                "alerts": C.AlertSection, "evidence": C.EvidenceSection, "mqtt": C.MqttSection,
                "health": C.HealthSection, "web": C.WebSection}
    assert set(C.AgentConfig.model_fields) == {s.rstrip("[]") for s in sections} | {"agent_id"}, "a new section: add it to this test"
    missing = [f"{name}.{key}" for name, cls in sections.items() for key in cls.model_fields
               if f"`{key}`" not in rows.get(name, "")]
    assert not missing, f"docs/agent.md key table lacks {missing}"


def test_unknown_agent_keys_get_the_nearest_known_key(tmp_path):
    """Through a camera list and a nested section: `cameras.0.trheshold` -> threshold, `mqtt.spool.max_mesages` ->
    max_messages; a key with no near neighbour gets none."""
    from agent.config import load_agent_config

    cfg = write(tmp_path, MINIMAL)
    with pytest.raises(UserError) as e:
        load_agent_config(cfg, ["cameras.0.trheshold=3", "mqtt.spool.max_mesages=3", "mqtt.zzz=1"])
    msg = str(e.value)
    assert "cameras.0.trheshold: unknown key (did you mean 'threshold'?)" in msg
    assert "mqtt.spool.max_mesages: unknown key (did you mean 'max_messages'?)" in msg
    assert "mqtt.zzz: unknown key" in msg and "mqtt.zzz: unknown key (" not in msg


def test_a_password_written_into_the_config_is_never_steered_into_another_key(tmp_path, monkeypatch):
    """`mqtt.password` gets the secret rule, not `did you mean 'password_env'` (which would take the password as a
    variable name and print it when the variable is missing); a secret-looking `password_env` is not echoed."""
    from agent.config import load_agent_config

    cfg = write(tmp_path, MINIMAL)
    with pytest.raises(UserError) as e:
        load_agent_config(cfg, ["mqtt.password=hunter2"])
    assert "a secret never goes in the config" in str(e.value) and "did you mean" not in str(e.value)
    assert "hunter2" not in str(e.value)
    monkeypatch.delenv("hunter2", raising=False)
    monkeypatch.delenv("MQTT_PASSWORD", raising=False)
    c = load_agent_config(cfg, ["mqtt.username=u", "mqtt.password_env=hunter2"])
    with pytest.raises(UserError) as e:
        c.mqtt.password()
    assert "hunter2" not in str(e.value) and "is not set" in str(e.value)
    c = load_agent_config(cfg, ["mqtt.username=u", "mqtt.password_env=MQTT_PASSWORD"])
    with pytest.raises(UserError, match="environment variable MQTT_PASSWORD is not set"):
        c.mqtt.password()


def test_a_key_in_the_wrong_section_names_where_it_belongs(tmp_path):
    from agent.config import load_agent_config

    with pytest.raises(UserError) as e:
        load_agent_config(write(tmp_path, MINIMAL), ["mqtt.threshold=3"])
    assert "mqtt.threshold: unknown key (did you mean 'model.threshold' or 'cameras[].threshold'?)" in str(e.value)


def test_a_camera_named_instead_of_indexed_in_set_says_how_to_index(tmp_path):
    from agent.config import load_agent_config

    with pytest.raises(UserError, match=r"cameras is a list: name an item by its index \(cameras\.0\.<key>=\.\.\.\)"):
        load_agent_config(write(tmp_path, MINIMAL), ["cameras.line1.threshold=3"])
