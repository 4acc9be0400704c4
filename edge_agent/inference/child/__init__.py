"""Everything that runs in the inference process, and the only code that imports onnxruntime_genai:
`worker` (the process's loop over its pipe), `core.Core` (the scheduler: every request in flight
advances a token per turn), `engine.OrtGenaiEngine` (one loaded model; it imports core, never the
reverse), `providers` (which execution provider loads it). The daemon starts `worker` as a process
and never imports this package (only the CLI's `models` and `providers` commands do). Of the
package it imports only `inference.types`, `errors`, `log` and `hardware`."""
