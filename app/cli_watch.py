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
        realtime: Annotated[bool, typer.Option(help="play the video at camera speed (25 fps) rather than as fast as "
                                                    "it decodes")] = True,
        video: Annotated[Path | None, typer.Option(help="this video file instead of the synthetic product (a "
                                                        "tiled model: its bare figure scores one frame's tiles "
                                                        "per batch)")] = None,
    ) -> None:
        """Agent frames/s vs the bare engine, stage latency, memory, time to first score, alerts in an outage."""
        from mae_ad.contract import UserError

        from .agent_bench import run_agent_bench
        from .common import setup_logging

        if video is not None and not video.is_file():
            raise UserError(f"--video {video}: no such file")
        setup_logging(False)
        res = run_agent_bench(model, backend=backend, seconds=seconds, cameras=cameras, threads=threads, out=out,
                              outage=outage, realtime=realtime, video_path=None if video is None else str(video))
        import json

        typer.echo(json.dumps(res, indent=2))
