"""Command values, the MQTT config keys and the classification of connection errors (no broker needed)."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mae_ad.contract import UserError

MINIMAL = {"model": {"backend": "brightness"}, "cameras": [{"name": "a", "source": "v.avi"}]}


@pytest.mark.parametrize("payload, value", [
    (b"0.42", 0.42), (b" 3 ", 3.0), (b'{"value": 0.2}', 0.2), (b"", None), (b"null", None), (b"reset", None),
    (b"RESET", None), (b'"reset"', None), (b'{"value": null}', None),
])
def test_threshold_values_accepted(payload, value):
    from agent.commands import parse_threshold

    assert parse_threshold(payload) == value


@pytest.mark.parametrize("payload, says", [
    (b"true", "expected a number, got true"), (b"false", "expected a number"), (b'"0.5"', "expected a number"),
    (b"[1]", "expected a number"), (b'{"value": true}', "expected a number, got true"),
    (b'{"v": 1}', "only 'value'"), (b'{"value": 1, "x": 2}', "only 'value'"), (b"NaN", "not a finite"),
    (b"Infinity", "not a finite"), (b"1e400", "not a finite"), (b"abc", "expected a number"),
    (b"\xff\xfe", "not UTF-8"),
])
def test_threshold_values_refused(payload, says):
    from agent.commands import parse_threshold

    with pytest.raises(ValueError, match="threshold") as e:
        parse_threshold(payload)
    assert says in str(e.value)


def test_threshold_range_is_relative_to_the_configured_threshold():
    from agent.commands import check_threshold, threshold_range

    assert threshold_range(0.17) == pytest.approx((0.017, 1.7))
    for ok in (0.017, 0.1, 0.17, 1.7):
        check_threshold(ok, 0.17, "cam")
    for bad, says in ((-1.0, "must be > 0"), (0.0, "must be > 0"), (1e300, "outside"), (1.71, "outside"),
                      (0.0169, "outside")):
        with pytest.raises(ValueError, match=says):
            check_threshold(bad, 0.17, "cam")
    check_threshold(5.0, -1.0, "cam")  # a non-positive configured threshold gives no scale: only > 0 is checked


def test_commands_without_a_value_refuse_one():
    from agent.commands import check_no_value

    for ok in (b"", b"  ", b"null", b"{}"):
        check_no_value("pause", ok)
    for bad in (b"false", b"0", b"resume", b'{"camera": "x"}'):
        with pytest.raises(ValueError, match="pause: takes no value"):
            check_no_value("pause", bad)


@pytest.mark.parametrize("key, value, says", [
    ("degraded_after_s", 0, "mqtt.degraded_after_s"), ("degraded_after_s", -5, "mqtt.degraded_after_s"),
    ("reconnect_min_s", 0, "mqtt.reconnect_min_s"), ("reconnect_max_s", 0.2, "reconnect_max_s: must be >="),
    ("refused_backoff_max_s", 0.5, "refused_backoff_max_s: must be >="), ("client_id", "", "mqtt.client_id"),
    ("client_id", "a\nb", "mqtt.client_id"),
])
def test_mqtt_keys_are_validated(key, value, says):
    from agent.config import agent_config_from_dict

    with pytest.raises(UserError) as e:
        agent_config_from_dict({**MINIMAL, "mqtt": {key: value}}, "x.yaml")
    assert says in str(e.value) and "x.yaml" in str(e.value)


def test_default_client_id_is_unique_per_process_and_an_explicit_one_is_kept(tmp_path):
    from agent.config import agent_config_from_dict
    from agent.mqtt import MqttLink, default_client_id
    from agent.spool import Spool

    a, b = default_client_id("line1"), default_client_id("line1")
    assert a != b and a.startswith("mae-ad-line1-") and a.split("-")[-2] == str(__import__("os").getpid())
    spool = Spool(tmp_path / "s", 10, "drop_oldest", False)
    cfg = agent_config_from_dict({**MINIMAL, "mqtt": {"client_id": "plant-7/line1"}})
    assert MqttLink(cfg.mqtt, "line1", spool).client_id == "plant-7/line1"


def test_connection_errors_are_described():
    from agent.mqtt import describe_connect_error

    def d(e: BaseException, tls: bool = False) -> tuple[str, bool]:
        return describe_connect_error(e, "mq.example", 8883, tls)

    assert d(socket.gaierror(-2, "Name or service not known"))[0].startswith("cannot resolve the broker host")
    assert "refused: no broker is listening" in d(ConnectionRefusedError(111, "Connection refused"))[0]
    assert "timed out" in d(TimeoutError("timed out"))[0] and "firewall" in d(TimeoutError())[0]
    cert = ssl.SSLCertVerificationError(1, "certificate verify failed")
    cert.verify_message = "unable to get local issuer certificate"
    text, needs_fix = d(cert, tls=True)
    assert "unable to get local issuer certificate" in text and "mqtt.tls.ca_file" in text and needs_fix
    assert "TLS listener" in d(ConnectionResetError(104, "Connection reset by peer"), tls=True)[0]
    assert "network or route" in d(OSError(113, "No route to host"))[0]


def test_cli_missing_or_bad_ca_file_is_one_error_line_before_anything_starts(tmp_path):
    (tmp_path / "not-a-cert.pem").write_text("hello\n")
    for ca, says in (("/nonexistent/ca.crt", "mqtt.tls.ca_file: /nonexistent/ca.crt not found"),
                     (str(tmp_path / "not-a-cert.pem"), "is not a readable PEM CA certificate")):
        cfg = {**MINIMAL, "mqtt": {"tls": {"ca_file": ca}, "spool": {"dir": str(tmp_path / "spool")}},
               "evidence": {"dir": str(tmp_path / "ev")}}
        p = tmp_path / "agent.yaml"
        p.write_text(yaml.safe_dump(cfg))
        exe = Path(sys.executable).with_name("mae-ad")
        r = subprocess.run([str(exe), "run", "--config", str(p), "--duration", "2"], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2, r.stderr
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and says in errors[0] and "Traceback" not in r.stderr
        assert not (tmp_path / "spool").exists()  # nothing started, nothing written
