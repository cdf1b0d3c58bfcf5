"""The watch stage: an edge agent that scores camera streams with a compiled model and publishes over MQTT.

`import agent` loads nothing heavy: no torch, no timm, no OpenCV, no paho. Each module imports what it needs, and
engines are opened lazily through `trt.backends.open_backend` (see `agent.backend`).

Modules, one concept each:
  config    - pydantic models of the agent YAML (`load_agent_config`, `dump_agent_config`)
  backend   - the `Backend` protocol the agent drives, and how a backend is opened
  capture   - camera sources and the newest-frame reader thread (drops counted, reconnect with back-off)
  preprocess- region of interest, resize, colour conversion -> float32 NCHW batch
  decide    - thresholds and the alert lifecycle (open after N, close after M, peak and box)
  evidence  - frame + heatmap overlay JPEGs of alerts, with retention
  spool     - durable, ordered, bounded alert spool (written before publish, removed on PUBACK)
  mqtt      - the MQTT link: topics, last will, commands, TLS, spool delivery
  health    - /healthz and Prometheus /metrics
  loop      - the Agent: wires all of the above, handles SIGTERM/SIGINT
  broker    - starts a local mosquitto (or an in-process broker) for the demo and the tests
  demo      - the self-contained demo (video, broker, agent, live view)
  bench     - end-to-end frames/s vs bare engine, stage latency, memory, time to first score
"""

__version__ = "0.1.0"
