"""`mae-ad camera-threshold` (agent.teach): a camera's threshold from its own normal frames, scored as the agent
scores them. The brightness engine stands in for a model; the frames are written here."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.backend import BrightnessBackend
from agent.config import CameraSection, agent_config_from_dict
from agent.preprocess import preprocess
from agent.teach import normal_frames, teach_threshold
from mae_ad.contract import UserError

ROOT = Path(__file__).resolve().parents[2]
MAE_AD = Path(sys.executable).with_name("mae-ad")


def _frames(n: int, seed: int = 0, h: int = 48, w: int = 80) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.clip(120 + rng.normal(0, 6 + 2 * i, (h, w, 3)), 0, 255).astype(np.uint8) for i in range(n)]


def _expected(frames: list[np.ndarray], cam: CameraSection, size: int = 32) -> list[float]:
    """The brightness engine's score of each frame, computed here without agent.scoring."""
    out = []
    for f in frames:
        x = preprocess(f, cam, size)[0]
        g = x.mean(axis=0)
        out.append(float(np.abs(g - np.median(g)).max()))
    return out


def test_threshold_is_the_quantile_of_the_frames_scored_as_the_agent_scores_them() -> None:
    cam = CameraSection(name="c", source="x.avi", roi={"x": 8, "y": 4, "width": 40, "height": 30})
    frames = _frames(12)
    be = BrightnessBackend(32, threshold=0.05)
    res = teach_threshold(be, cam, iter(frames), target_fpr=0.01)
    want = _expected(frames, cam)
    assert res["scores"] == pytest.approx(want, abs=1e-6)  # the ROI was cut: a whole-frame score differs
    assert res["scores"] != pytest.approx(_expected(frames, CameraSection(name="c", source="x.avi")), abs=1e-6)
    assert res["threshold"] == pytest.approx(max(want)) and res["n_frames"] == 12  # 12 < 1/0.01: the maximum
    assert res["above_model_threshold"] == sum(s > 0.05 for s in want) and res["model_threshold"] == 0.05
    half = teach_threshold(be, cam, iter(frames), target_fpr=0.5)["threshold"]
    assert half == pytest.approx(sorted(want)[6])  # the next observed score above the median


def test_too_few_or_mixed_size_frames_are_refused() -> None:
    cam = CameraSection(name="c", source="x.avi")
    be = BrightnessBackend(32)
    with pytest.raises(UserError, match="at least 2 normal frames"):
        teach_threshold(be, cam, iter(_frames(1)))
    with pytest.raises(UserError, match="different sizes"):
        teach_threshold(be, cam, iter(_frames(2) + _frames(1, w=96)))


def test_normal_frames_reads_a_folder_every_nth_and_a_video(tmp_path) -> None:
    import cv2

    frames = _frames(6)
    folder = tmp_path / "good"
    folder.mkdir()
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / f"{i:02d}.png"), f)
    (folder / "notes.txt").write_text("not an image")
    cfg = agent_config_from_dict({"model": {"backend": "brightness"}, "cameras": [{"name": "c", "source": "x"}]})
    got = list(normal_frames(CameraSection(name="c", source=str(folder)), cfg, frames=2, every=2))
    assert len(got) == 2 and np.array_equal(got[0], frames[0]) and np.array_equal(got[1], frames[2])
    writer = cv2.VideoWriter(str(tmp_path / "v.avi"), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*"FFV1"), 5.0, (80, 48))
    for f in frames:
        writer.write(f)
    writer.release()
    vid = list(normal_frames(CameraSection(name="c", source=str(tmp_path / "v.avi"), loop=True), cfg, frames=50))
    assert len(vid) == 6 and np.array_equal(vid[5], frames[5])  # read once to the end, never looped
    with pytest.raises(UserError, match="no images"):
        list(normal_frames(CameraSection(name="c", source=str(tmp_path)), cfg, frames=3))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(MAE_AD), *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_camera_threshold_command_prints_the_setting_and_refuses_bad_input(tmp_path) -> None:
    import cv2

    frames = _frames(5, seed=2)
    folder = tmp_path / "normal"
    folder.mkdir()
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / f"{i}.png"), f)
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("model: {backend: brightness, input_size: 32}\n"
                   "cameras:\n  - {name: a, source: nowhere.avi}\n  - {name: b, source: nowhere.avi}\n")
    out = tmp_path / "teach.json"
    r = _cli("camera-threshold", "-c", str(cfg), "--camera", "b", "--source", str(folder), "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    want = max(_expected(frames, CameraSection(name="b", source="x")))
    printed = float(re.search(r"--set cameras\.1\.threshold=(\S+)", r.stdout).group(1))
    saved = json.loads(out.read_text())
    assert saved["threshold"] == pytest.approx(want, abs=1e-6) and saved["n_frames"] == 5 and saved["camera"] == "b"
    # printed exactly: no taught frame scores above the threshold it is given (rounding once flagged one)
    assert printed == saved["threshold"] and max(saved["scores"]) <= printed
    assert "take 100 or more" in r.stdout and "warning" not in r.stderr
    # bad input: one error line naming what is wrong, exit 2, nothing written or overwritten
    before = out.read_text()
    r = _cli("camera-threshold", "-c", str(cfg), "--camera", "b", "--source", str(folder), "--out", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr and out.read_text() == before
    r = _cli("camera-threshold", "-c", str(cfg), "--camera", "zz", "--source", str(folder))
    assert r.returncode == 2 and "--camera 'zz'" in r.stderr and "cameras: a, b" in r.stderr
    assert "Traceback" not in r.stderr
    r = _cli("camera-threshold", "-c", str(cfg), "--camera", "a")
    assert r.returncode == 2 and "nowhere.avi" in r.stderr and "Traceback" not in r.stderr


def test_threshold_rule_refuses_no_scores_and_a_bad_rate() -> None:
    from mae_ad.contract import threshold_from_scores

    assert threshold_from_scores([3.0, 1.0, 2.0], 0.4) == 3.0  # the 0.6 quantile, next observed score up
    assert threshold_from_scores(list(range(1000)), 0.01) == 990.0
    with pytest.raises(ValueError, match="no normal scores"):
        threshold_from_scores([], 0.01)
    with pytest.raises(ValueError, match="target_fpr"):
        threshold_from_scores([1.0], 1.0)


def test_camera_threshold_refuses_a_roi_the_agent_refuses_and_takes_a_clip_for_a_device(tmp_path) -> None:
    import cv2

    folder = tmp_path / "normal"
    folder.mkdir()
    for i, f in enumerate(_frames(3, seed=4)):  # 80 x 48 frames
        cv2.imwrite(str(folder / f"{i}.png"), f)
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("model: {backend: brightness, input_size: 32}\n"
                   "cameras:\n  - {name: usb, source: 0, kind: device, roi: {x: 0, y: 0, width: 400, height: 40}}\n")
    r = _cli("camera-threshold", "-c", str(cfg), "--camera", "usb", "--source", str(folder))
    assert r.returncode == 2 and "cameras.0.roi" in r.stderr and "would not score" in r.stderr, r.stderr[-800:]
    assert "Traceback" not in r.stderr
    # the same device camera taught from a recorded clip: the clip's kind is its own, not the camera's
    r = _cli("camera-threshold", "-c", str(cfg), "--camera", "usb", "--source", str(folder),
             "--set", "cameras.0.roi.width=60")
    assert r.returncode == 0 and "--set cameras.0.threshold=" in r.stdout, r.stderr[-800:]


def test_camera_threshold_warns_when_the_frames_score_far_above_the_calibrated_threshold(tmp_path) -> None:
    import cv2

    folder = tmp_path / "normal"
    folder.mkdir()
    for i, f in enumerate(_frames(3, seed=5)):
        if i == 1:
            f[10:20, 10:20] = 255  # a defect among the "normal" frames
        cv2.imwrite(str(folder / f"{i}.png"), f)
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("model: {backend: brightness, input_size: 32}\n"
                   "cameras:\n  - {name: a, source: x.avi}\n")
    r = _cli("camera-threshold", "-c", str(cfg), "--camera", "a", "--source", str(folder))
    assert r.returncode == 0 and "warning:" in r.stderr and "times the model's calibrated threshold" in r.stderr


def test_camera_threshold_compares_with_model_threshold_when_one_is_set(tmp_path) -> None:
    import cv2

    folder = tmp_path / "normal"
    folder.mkdir()
    for i, f in enumerate(_frames(3, seed=6)):
        cv2.imwrite(str(folder / f"{i}.png"), f)
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("model: {backend: brightness, input_size: 32, threshold: 0.001}\n"
                   "cameras:\n  - {name: a, source: x.avi}\n")
    r = _cli("camera-threshold", "-c", str(cfg), "--camera", "a", "--source", str(folder))
    assert r.returncode == 0 and "model.threshold 0.001 flags 3 of these 3" in r.stdout, r.stdout
    assert "times model.threshold" in r.stderr
