"""The watch stage's commands (agent/), added to `mae-ad` by `register(app)`. Imports live inside the command
bodies; `run` hands the agent the compile stage's engine opener (`trt.backends.open_backend`), imported only when
the configured engine is a real one, so the agent never imports trt itself."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run(
        config: Annotated[Path, typer.Option("--config", "-c", help="agent YAML (see configs/agent*.yaml)")],
        set_: Annotated[list[str] | None, typer.Option("--set", help="override: section.key=value; "
                                                       "cameras.0.threshold=0.4 (repeatable)")] = None,
        duration: Annotated[float | None, typer.Option(help="stop after this many seconds (default: run until "
                                                       "SIGTERM/SIGINT)")] = None,
        verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
    ) -> None:
        """Watch the cameras, score every frame it can, publish scores, alerts and heatmaps over MQTT."""
        from agent.config import install_log_redaction, load_agent_config
        from mae_ad.contract import UserError

        from .common import setup_logging

        setup_logging(verbose)
        install_log_redaction()
        cfg = load_agent_config(config, set_)
        try:
            import cv2  # noqa: F401
        except ImportError as e:
            raise UserError(f"OpenCV cannot be imported ({e}): install mae-ad[agent] (pip OpenCV), or keep the "
                            "system/JetPack OpenCV: a venv made with --system-site-packages and mae-ad"
                            "[agent-system-opencv] (docs/agent.md, 'Jetson')") from None
        from agent.loop import Agent

        from .engines import open_engine

        code = Agent(cfg, engines=open_engine).run(duration_s=duration)
        raise typer.Exit(code)

    @app.command("camera-threshold")
    def camera_threshold(
        config: Annotated[Path, typer.Option("--config", "-c", help="agent YAML: the model, and the camera's ROI "
                                                                    "and source")],
        camera: Annotated[str, typer.Option(help="the camera's name in the config")],
        source: Annotated[str | None, typer.Option(help="read the normal frames from here instead of the camera's "
                                                        "source: a clip recorded from it, or a folder of its images")
                          ] = None,
        frames: Annotated[int, typer.Option(help="normal frames to score", min=2)] = 30,
        every: Annotated[int, typer.Option(help="take every N-th frame (consecutive live frames are near copies)",
                                           min=1)] = 1,
        target_fpr: Annotated[float, typer.Option(help="false-alarm rate on these normal frames the threshold "
                                                       "aims at (calibration's default: 0.01)")] = 0.01,
        set_: Annotated[list[str] | None, typer.Option("--set", help="override the agent config: section.key=value "
                                                       "(repeatable)")] = None,
        out: Annotated[Path | None, typer.Option(help="also write the scores and threshold here (JSON)")] = None,
        verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
    ) -> None:
        """A camera's threshold from its own normal frames, scored exactly as the agent scores them (ROI, tiling,
        score rule): prints the `--set cameras.N.threshold=...` to run the agent with. Only normal frames."""
        import json

        import numpy as np

        from agent.backend import open_backend
        from agent.config import install_log_redaction, load_agent_config
        from agent.teach import camera_index, normal_frames, teach_threshold
        from mae_ad.contract import UserError

        from .common import setup_logging
        from .engines import open_engine

        setup_logging(verbose)
        install_log_redaction()
        if not 0.0 < target_fpr < 1.0:
            raise UserError(f"--target-fpr {target_fpr}: must lie in (0, 1)")
        if out is not None and out.exists():
            raise UserError(f"--out {out}: already exists; refusing to overwrite it")
        cfg = load_agent_config(config, set_)
        i = camera_index(cfg, camera)
        # a clip or folder stands in for the camera: its kind is guessed from --source, not the camera's
        cam = cfg.cameras[i] if source is None else \
            cfg.cameras[i].model_copy(update={"source": source, "kind": "auto", "reader": "auto"})
        be = open_backend(cfg.model, open_engine)
        try:
            res = teach_threshold(be, cam, normal_frames(cam, cfg, frames, every), target_fpr,
                                  cfg.model.tile_batch, f"model.path={cfg.model.path}", f"cameras.{i}.roi",
                                  cfg.model.threshold)
        finally:
            be.close()
        h, w = res["frame_shape"]
        typer.echo(f"camera {camera}: {res['n_frames']} normal frames ({w}x{h}"
                   + (f", {res['tiles_per_frame']} tiles each" if res["tiles_per_frame"] > 1 else "") + ") scored")
        typer.echo(f"scores: min {res['score_min']:.5g}, median {res['score_median']:.5g}, max {res['score_max']:.5g}")
        if res["model_threshold"] is not None:
            what = "model.threshold" if res["model_threshold_source"] == "model.threshold" else \
                "the model's calibrated threshold"
            typer.echo(f"{what} {res['model_threshold']:.5g} flags "
                       f"{res['above_model_threshold']} of these {res['n_frames']} normal frames")
        n_needed = int(np.ceil(1 / target_fpr))
        typer.echo(f"threshold {res['threshold']:.5g}: the {1 - target_fpr:g} quantile of these frames"
                   + (f" (their maximum: fewer than {n_needed} frames; take {n_needed} or more for a quantile)"
                      if res["threshold"] == res["score_max"] and res["n_frames"] < n_needed else ""))
        mt = res["model_threshold"]
        if mt is not None and res["threshold"] > 2 * mt:
            typer.echo(f"warning: that is {res['threshold'] / mt:.1f} times {what}; make sure every "
                       "one of these frames is normal (a defect among them lifts the threshold above it)", err=True)
        # repr: the exact float, so that no taught frame scores above its own threshold by rounding
        typer.echo(f"run the agent with: --set cameras.{i}.threshold={res['threshold']!r}")
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(json.dumps({"camera": camera, "config": str(config), **res}, indent=2) + "\n")
            tmp.replace(out)

    @app.command("agent-demo")
    def agent_demo(
        model: Annotated[str | None, typer.Option(help="engine file: .onnx, .plan or a bundle dir (default: the "
                                                  "numpy brightness engine)")] = None,
        backend: Annotated[str | None, typer.Option(help="onnxruntime | tensorrt | torch | brightness (default: "
                                                    "by the model's file type)")] = None,
        seconds: Annotated[float, typer.Option(help="how long the agent watches")] = 20.0,
        out: Annotated[Path, typer.Option("--out", "-o", help="work directory (video, spool, evidence)")] = Path(
            "demo_out/agent"),
        broker: Annotated[str, typer.Option(help="auto | mosquitto | inprocess")] = "auto",
    ) -> None:
        """The watch stage on its own: a synthetic product video with defects, a local broker, the agent, and a
        live view of the MQTT messages."""
        from .agent_demo import run_agent_demo
        from .common import setup_logging

        setup_logging(False)
        summary = run_agent_demo(model, out, seconds=seconds, backend=backend, broker=broker)
        typer.echo(" ".join(f"{k}={v}" for k, v in summary.items() if not isinstance(v, (dict, list))))

    @app.command("agent-bench")
    def agent_bench(
        model: Annotated[str | None, typer.Option(help=".onnx / .plan / bundle dir (default: brightness engine)")
                         ] = None,
        backend: Annotated[str | None, typer.Option(help="engine kind (default: by file type)")] = None,
        seconds: Annotated[float, typer.Option(help="seconds per measurement")] = 15.0,
        cameras: Annotated[int, typer.Option(help="cameras (copies of the synthetic video)")] = 1,
        threads: Annotated[int | None, typer.Option(help="engine threads")] = None,
        out: Annotated[Path | None, typer.Option(help="write results JSON here")] = None,
        outage: Annotated[bool, typer.Option(help="also run the broker-outage scenario")] = True,
        realtime: Annotated[bool, typer.Option(help="play the video at its own frame rate, as a camera delivers it "
                                                    "(the synthetic one: 25 fps), rather than as fast as it "
                                                    "decodes")] = True,
        video: Annotated[Path | None, typer.Option(help="this video file instead of the synthetic product (a "
                                                        "tiled model: its bare figure scores one frame's tiles "
                                                        "per batch)")] = None,
        min_frames: Annotated[int, typer.Option(help="the agent's window lasts until more than this many frames "
                                                     "are scored (a slow tiled model: longer than --seconds)",
                                                min=1)] = 10,
        threshold: Annotated[float | None, typer.Option(help="every camera's threshold instead of the model's (e.g. "
                                                            "from `mae-ad camera-threshold`)")] = None,
        decode: Annotated[str, typer.Option(help="the cameras' decode: eager, or lazy (an MJPEG video's frames are "
                                                 "decoded only when scored)")] = "eager",
    ) -> None:
        """Agent frames/s vs the bare engine, stage latency, memory, time to first score, alerts in an outage."""
        from mae_ad.contract import UserError

        from .agent_bench import run_agent_bench
        from .common import setup_logging

        if video is not None and not video.is_file():
            raise UserError(f"--video {video}: no such file")
        if decode not in ("eager", "lazy"):
            raise UserError(f"--decode {decode!r}: expected eager or lazy")
        setup_logging(False)
        res = run_agent_bench(model, backend=backend, seconds=seconds, cameras=cameras, threads=threads, out=out,
                              outage=outage, realtime=realtime, video_path=None if video is None else str(video),
                              min_frames=min_frames, threshold=threshold, decode=decode)
        import json

        typer.echo(json.dumps(res, indent=2))
