"""The watch stage: an edge agent that scores camera streams with a compiled model and publishes over MQTT.

`import agent` loads nothing heavy: no torch, no timm, no OpenCV, no paho. Each module imports what it needs; of this
project the agent imports only `mae_ad.contract`, and real engines are opened by the `EngineOpener` its caller hands
in (`mae-ad run` passes `trt.backends.open_backend`; see `agent.backend`). The agent demo and benchmark, which wire
it to the synthetic product and the compile stage, live in `app/`.

Modules, one concept each:
  config    - pydantic models of the agent YAML (`load_agent_config`, `dump_agent_config`)
  backend   - the `Backend` protocol the agent drives, the `EngineOpener` it is given, the brightness engine
  capture   - camera sources and the newest-frame reader thread (drops counted, reconnect with back-off)
  preprocess- region of interest, resize, colour conversion -> float32 NCHW batch
  scoring   - frames -> maps and scores through the engine by the model's resize policy or tiling (`score_frames`)
  teach     - a camera's threshold from its own normal frames (`mae-ad camera-threshold`)
  decide    - thresholds and the alert lifecycle (open after N, close after M, peak and box)
  evidence  - frame + heatmap overlay JPEGs of alerts, with retention
  spool     - durable, ordered, bounded alert spool (written before publish, removed on PUBACK)
  mqtt      - the MQTT link: topics, last will, commands, TLS, spool delivery
  payloads  - the versioned JSON Schemas of every JSON payload published (agent/schemas/, docs/mqtt.md)
  commands  - checking the values of pause/resume/threshold/snapshot commands
  health    - /healthz and Prometheus /metrics
  loop      - the Agent: wires all of the above, handles SIGTERM/SIGINT
  broker    - starts a local mosquitto (or an in-process broker) for the demo and the tests
  web       - the live view for the line engineer (HTTP over the loop's state; static files in agent/static)
"""

__version__ = "0.1.0"
