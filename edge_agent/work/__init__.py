"""Work: one request's path inside the daemon. `intake.Intake` is the one door (MQTT
requests, cancels, rule runs, Home Assistant prompts become `jobs.Job`s: parsed, routed,
de-duplicated); `lanes.Scheduler` queues them (requests before background work, bounded) and
its workers run them (`jobs.run`) on the `handler.RequestHandler` of the settings snapshot
(`snapshot.Snapshot`) each was accepted under; frames come from `frames.ImageGatherer`;
`overflow` sends what the local model cannot take to a remote server. A job ends one way:
`Job.finish`, to its `JobEnd` (delivery for a pipeline's request).

Never imports `automation/`, `daemon/`, `cli/`, paho, cv2 or onnxruntime_genai.
"""
