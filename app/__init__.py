"""The wiring: the `mae-ad` command line and the demos, the one place that ties the three stages together.

    mae_ad  (learn)   <-  trt  (compile)           agent  (watch: imports mae_ad.contract only)
        ^                   ^                          ^
        +------------------ app (cli, demo, agent demo/bench) -+

Each command imports the stage it runs inside its body, so `mae-ad --help` and the agent's commands never load
torch. Nothing imports this package back: `mae_ad`, `trt` and `agent` import nothing upward
(tests/test_import_graph.py holds them to it).

Modules:
  cli          - the Typer app, the learning stage's commands, `main` (the `mae-ad` console script)
  cli_compile  - the compile stage's commands (merge, export, quantize, check-trt, build-engine, probe)
  cli_watch    - the watch stage's commands (run, camera-threshold, agent-demo, agent-bench)
  common       - logging set-up shared by the commands
  demo         - `mae-ad demo`: learn -> compile -> watch on synthetic data
  agent_demo   - the watch stage's demo: synthetic product video, local broker, agent, live message view
  agent_bench  - agent frames/s vs the bare engine, latency, memory, alerts across a broker outage
"""
