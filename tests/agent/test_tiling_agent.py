"""The agent with a tiled model (input.resize=tile, issue 11) against a real mosquitto: a small defect on a wide frame
raises an alert whose box lies on it in frame pixels, every frame's tiles go through the engine as one batch, and the
published heatmap has the scaled ROI's shape. ROI refusals. The brightness engine stands in for a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mae_ad.contract import UserError
from tests.agent.conftest import AgentThread, agent_cfg, wait_until

W, H = 320, 192  # the frame; 64-px tiles with overlap 16 -> 7 x 4 = 28 tiles
DEFECT = (217, 131)  # centre of the 6-px dark pit, in frame pixels
DEFECT_FRAMES = range(10, 20)


def _video(path: Path, n: int = 30) -> Path:
    import cv2

    rng = np.random.default_rng(0)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 20.0, (W, H))  # type: ignore[attr-defined]
    assert writer.isOpened()
    for i in range(n):
        img = np.clip(128 + rng.normal(0, 2, (H, W, 3)), 0, 255).astype(np.uint8)
        if i in DEFECT_FRAMES:
            cv2.circle(img, DEFECT, 3, (40, 40, 40), -1)
        writer.write(img)
    writer.release()
    return path


class CountingTiledBackend:
    """The brightness engine declaring a tiled model, recording each call's batch size."""

    def __init__(self, max_batch: int | None = None):
        from agent.backend import BrightnessBackend

        self.inner = BrightnessBackend(64, threshold=0.17, max_batch=max_batch)
        self.name, self.input_size, self.max_batch = "brightness", 64, max_batch
        inp = self.inner.meta.input.model_copy(update={"resize": "tile", "tile_scale": 1.0, "tile_overlap": 16})
        self.meta = self.inner.meta.model_copy(update={"input": inp})
        self.batches: list[int] = []

    def infer(self, images: np.ndarray) -> Any:
        self.batches.append(int(images.shape[0]))
        return self.inner.infer(images)

    def close(self) -> None:
        pass


@pytest.mark.broker
def test_tiled_agent_alerts_on_a_small_defect_with_one_batch_per_frame(tmp_path, broker, recorder) -> None:
    import cv2

    video = _video(tmp_path / "wide.avi")
    cfg = agent_cfg(tmp_path, broker.port, [{"name": "line", "source": str(video), "loop": False}],
                    mqtt={"heatmap_interval_s": 0.0001}, model={"tile_batch": 32})
    backend = CountingTiledBackend()
    at = AgentThread(cfg, backend).start()
    try:
        assert wait_until(lambda: "line" in at.agent.cams and at.agent.cams["line"].reader.status == "ended", 30)
        assert recorder.wait_for(lambda: any(e["event"] == "end" for e in recorder.json("alert")), 10)
    finally:
        at.stop()
    assert at.agent.frames_scored > 0 and set(backend.batches) == {28}  # a frame's 28 tiles: one engine call
    # every scored frame is in the loop's turn log (agent-bench's rate), one turn per frame (one camera)
    assert [n for _, n in at.agent.turns] == [1] * at.agent.frames_scored == [1] * len(backend.batches)
    ends = [t for t, _ in at.agent.turns]
    assert ends == sorted(ends)
    start = next(e for e in recorder.json("alert") if e["event"] == "start")
    assert start["start_frame_id"] in DEFECT_FRAMES
    x0, y0, x1, y1 = start["box"]
    assert x0 <= DEFECT[0] < x1 and y0 <= DEFECT[1] < y1 and x1 - x0 < 40 and y1 - y0 < 40
    anomalous = [d["frame_id"] for d in recorder.json("score") if d["anomalous"]]
    assert anomalous and set(anomalous) <= set(DEFECT_FRAMES)
    heat = cv2.imdecode(np.frombuffer(recorder.payloads("heatmap")[0], np.uint8), cv2.IMREAD_COLOR)
    assert heat.shape[:2] == (H, W)  # the stitched map of the whole ROI, not a 64-px square


@pytest.mark.broker
@pytest.mark.parametrize("max_batch,expect", [(None, 8), (5, 5)])
def test_tiled_agent_chunks_tiles_by_tile_batch_and_the_engines_max_batch(tmp_path, broker, recorder, max_batch,
                                                                           expect) -> None:
    """model.tile_batch (default 8) bounds the tiles per engine call (memory), and so does the engine's max batch."""
    video = _video(tmp_path / "wide.avi", n=12)
    cfg = agent_cfg(tmp_path, broker.port, [{"name": "line", "source": str(video), "loop": False}])
    backend = CountingTiledBackend(max_batch=max_batch)
    at = AgentThread(cfg, backend).start()
    try:
        assert wait_until(lambda: "line" in at.agent.cams and at.agent.cams["line"].reader.status == "ended", 30)
    finally:
        at.stop()
    assert at.agent.frames_scored > 0 and max(backend.batches) == expect and sum(backend.batches) % 28 == 0


def test_tiled_agent_refuses_an_roi_smaller_than_a_tile(tmp_path) -> None:
    from agent.loop import Agent

    cfg = agent_cfg(tmp_path, 1, [{"name": "line", "source": "x.avi", "roi": {"x": 0, "y": 0, "width": 200,
                                                                              "height": 40}}])
    with pytest.raises(UserError, match=r"cameras.0.roi: 200x40 px .* smaller than one 64-px tile"):
        Agent(cfg, CountingTiledBackend())._setup()


def test_roi_outside_the_requested_capture_size_is_a_config_error(tmp_path) -> None:
    with pytest.raises(UserError, match=r"roi: x=300 .* outside the 320x192 frame"):
        agent_cfg(tmp_path, 1, [{"name": "line", "source": 0, "width": 320, "height": 192,
                                 "roi": {"x": 300, "y": 0, "width": 64, "height": 64}}])


@pytest.mark.broker
def test_roi_outside_the_frame_at_run_time_is_named_and_not_scored(tmp_path, broker, recorder, caplog) -> None:
    video = _video(tmp_path / "wide.avi", n=12)
    cfg = agent_cfg(tmp_path, broker.port, [{"name": "line", "source": str(video), "loop": False,
                                             "roi": {"x": 300, "y": 0, "width": 64, "height": 64}}])
    at = AgentThread(cfg, CountingTiledBackend()).start()
    try:
        assert wait_until(lambda: "line" in at.agent.cams and at.agent.cams["line"].reader.status == "ended", 30)
        assert recorder.wait_for(lambda: any(b"reaches outside the 320x192 frame" in p
                                             for p in recorder.payloads("status/detail")), 10)
    finally:
        at.stop()
    assert at.agent.frames_scored == 0 and not recorder.json("score")
    assert sum("reaches outside the 320x192 frame" in r.getMessage() for r in caplog.records) == 1


def test_frames_smaller_than_a_tile_are_refused_with_the_key_named() -> None:
    from agent.config import CameraSection, RoiSection
    from agent.preprocess import roi_outside
    from mae_ad.tiling import TileSpec

    spec = TileSpec(64, 16, 0.5)
    cam = CameraSection(name="c", source="x.avi")
    assert roi_outside((192, 320, 3), cam, "cameras.0.roi", spec) is None  # 160 x 96 working px: tiles fit
    why = roi_outside((100, 320, 3), cam, "cameras.0.roi", spec)
    assert why is not None and "the 320x100 frame at the model's tile scale 0.5 is 160x50 px" in why
    roi = CameraSection(name="c", source="x.avi", roi=RoiSection(x=0, y=0, width=100, height=200))
    why = roi_outside((192, 320, 3), roi, "cameras.0.roi", None)
    assert why is not None and why.startswith("cameras.0.roi: x=0 y=0") and "outside the 320x192 frame" in why
    assert roi_outside((256, 320, 3), roi, "cameras.0.roi", None) is None
