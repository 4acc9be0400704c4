"""Everything that runs in the inference process, and the only code that imports onnxruntime_genai:
`worker` (the process's loop over its pipe), `core.Core` (the scheduler: every request in flight
advances a token per turn), `run` (a request's progress), `group` (requests started together on
one batched generator), `engine_runs` (requests on the runtime's og.Engine), `prefix` (finished
generators kept for prompt-prefix reuse; core imports these four), `engine.OrtGenaiEngine` (one
loaded model; it imports core, never the reverse), `providers` (which execution provider loads
it). The daemon starts `worker` as a process and never imports this package (only the CLI's
`models` and `providers` commands do). Of the package it imports only `inference.types`,
`errors`, `log` and `hardware`."""

import os

# The runtime's own switch: ORT and ORT GenAI (Linux wheels included) send usage events to
# Microsoft unless this is set before they start (README, "What leaves the box"). Each name is
# one their sources have used; a value the user set (0: send) is left as it is.
RUNTIME_TELEMETRY_OFF = ("ORT_DISABLE_TELEMETRY", "ORT_TELEMETRY_DISABLED", "ORT_GENAI_TELEMETRY_DISABLED")


def runtime_telemetry_off() -> None:
    """Turn the runtime's telemetry off for this process, before onnxruntime_genai loads."""
    for name in RUNTIME_TELEMETRY_OFF:
        os.environ.setdefault(name, "1")


# Here, so that it runs before any module of this package imports onnxruntime_genai.
runtime_telemetry_off()
