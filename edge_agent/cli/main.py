"""Command line: argument parsing and exit codes; nothing else."""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path
from typing import Any

from edge_agent import __version__
from edge_agent.cli.common import (EXIT_ERROR_ANSWER, EXIT_NO_ANSWER, EXIT_USAGE, Handler, config_error, load,
                                   send_and_print)
from edge_agent.cli.events import HANDLERS as EVENT_HANDLERS, add_parsers as add_event_commands
from edge_agent.cli.models import HANDLERS as MODEL_HANDLERS, add_parsers as add_model_commands
from edge_agent.cli.watch import HANDLERS as WATCH_HANDLERS, add_parsers as add_watch_commands
from edge_agent.errors import EXIT_CONFIG, ConfigError



def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description=(
        "Answers prompts over MQTT with a local model through ONNX Runtime GenAI."))
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    config_help = "settings file (default: $EDGE_AGENT_CONFIG, else /etc/edge-agent/agent.toml)"

    run = commands.add_parser("run", help="run the daemon")
    run.add_argument("--config", help=config_help)

    check = commands.add_parser("check-config", help="print the effective settings or every error")
    check.add_argument("--config", help=config_help)
    check.add_argument("--explain", action="store_true", help="show which file set each value")

    ask = commands.add_parser("ask", help="send one prompt over MQTT and print the answer")
    ask.add_argument("prompt", nargs="?", help="the question (or --template)")
    ask.add_argument("--template", help="a prompt template from the agent's settings, instead of a prompt")
    ask.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                     help="a value for the template (repeatable)")
    ask.add_argument("--id", help="request id; asking again with the same id gets the stored answer")
    ask.add_argument("--config", help=config_help)
    ask.add_argument("--host", help="broker host (overrides the settings)")
    ask.add_argument("--port", type=int, help="broker port (overrides the settings)")
    ask.add_argument("--device", help="device_id of the agent to ask")
    ask.add_argument("--fleet", action="store_true",
                     help="ask the pool instead: <prefix>/fleet/request (agents with mqtt.shared_group)")
    ask.add_argument("--protocol", choices=["5", "3.1.1"], help="MQTT version of this client")
    ask.add_argument("--system", help="system prompt")
    ask.add_argument("--max-tokens", type=int, help="cap on generated tokens")
    ask.add_argument("--camera", action="append", help="ask about this configured camera (repeatable)")
    ask.add_argument("--image", action="append", help="attach this image file (repeatable)")
    ask.add_argument("--frames", type=int, help="frames from the one camera, --interval-ms apart")
    ask.add_argument("--interval-ms", type=int, help="time between frames")
    ask.add_argument("--include-frame", action="store_true", help="return the JPEGs the model saw")

    snap = commands.add_parser("snapshot", help="save the current frame of a camera (for set-up)")
    snap.add_argument("--camera", required=True, help="a camera name from the settings")
    snap.add_argument("-o", "--output", help="JPEG file to write (default: <camera>.jpg)")
    snap.add_argument("--config", help=config_help)
    ask.add_argument("--json", action="store_true", help="print the whole answer as JSON")
    ask.add_argument("--stream", action="store_true", help="print the text as it is generated")
    ask.add_argument("--response-format", metavar="JSON",
                     help='hold the answer to a format, e.g. \'{"type": "json_object"}\' (docs/protocol.md)')
    ask.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default 60)")
    add_model_commands(commands, config_help)  # providers, models list|pull|verify
    add_watch_commands(commands, config_help)  # watch list|run
    add_event_commands(commands, config_help)  # events
    return parser


def cmd_check_config(args: argparse.Namespace) -> int:
    from edge_agent.cameras.camera_set import validate_cameras
    from edge_agent.settings.files import describe_settings, explain_settings

    settings, sources = load(args.config)
    validate_cameras(settings)
    plan = memory_plan_lines(settings)  # a budget below the weights is a settings error
    if args.explain:
        rows = explain_settings(settings, sources)
        width = max(len(key) for key, _, _ in rows)
        for key, value, origin in rows:
            print(f"{key:<{width}}  {json.dumps(value):<30}  # {origin}")
        print("\n".join(f"# {line}" for line in plan))
        return 0
    files = ", ".join(str(f) for f in sources.files) or "defaults"
    print(f"# settings from {files} and EDGE_AGENT_* environment")
    print(json.dumps(describe_settings(settings), indent=2))
    return 0


def memory_plan_lines(settings: Any) -> list[str]:
    """The memory plan for the configured model, before loading it (ConfigError: exit 78)."""
    from edge_agent.daemon.parts import memory_plan
    from edge_agent.errors import ModelLoadError

    try:
        plan = memory_plan(settings)
    except ModelLoadError as exc:
        return [f"memory plan: not made ({exc})"]
    if plan is None:
        return ['memory plan: none (model.backend = "openai": the server holds the model)']
    return plan.explain()


def cmd_run(args: argparse.Namespace) -> int:
    from edge_agent import log
    from edge_agent.daemon.main import run

    settings, sources = load(args.config)
    log.configure(settings.log_level, settings.log_format)
    try:
        return run(settings, sources)
    except KeyboardInterrupt:  # second Ctrl-C during shutdown
        return 130


def cmd_ask(args: argparse.Namespace) -> int:
    from edge_agent.protocol import Topics, encode

    settings, _ = load(args.config)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port),
                                   ("protocol", args.protocol)) if v is not None}
    mqtt_settings = settings.mqtt.model_copy(update=overrides)
    topics = Topics(mqtt_settings.topic_prefix, args.device or settings.device_id)
    topic = topics.fleet_request if args.fleet else topics.request
    if args.fleet and args.device:
        print("edge-agent ask: --fleet asks the pool, not one --device", file=sys.stderr)
        return EXIT_USAGE
    if (args.prompt is None) == (args.template is None):
        print("edge-agent ask: give a prompt or --template, not both", file=sys.stderr)
        return EXIT_USAGE
    request: dict[str, Any] = {"prompt": args.prompt} if args.template is None else {"template": args.template}
    if args.var:
        if args.template is None or not all("=" in v for v in args.var):
            print("edge-agent ask: --var NAME=VALUE goes with --template", file=sys.stderr)
            return EXIT_USAGE
        request["vars"] = dict(v.split("=", 1) for v in args.var)
    if args.id is not None:
        request["id"] = args.id
    if args.system:
        request["system"] = args.system
    if args.max_tokens is not None:
        request["max_tokens"] = args.max_tokens
    if args.camera:
        request["camera"] = args.camera[0] if len(args.camera) == 1 else args.camera
    if args.include_frame:
        request["include_frame"] = True
    for key, value in (("frames", args.frames), ("interval_ms", args.interval_ms)):
        if value is not None:
            request[key] = value
    if args.stream:
        request["stream"] = True
    if args.response_format is not None:
        try:
            request["response_format"] = json.loads(args.response_format)
        except ValueError as exc:
            print(f"edge-agent ask: --response-format is not JSON: {exc}", file=sys.stderr)
            return EXIT_USAGE
    if args.image:
        try:
            request["images"] = [base64.b64encode(Path(f).read_bytes()).decode("ascii") for f in args.image]
        except OSError as exc:
            print(f"edge-agent ask: cannot read image: {exc}", file=sys.stderr)
            return EXIT_NO_ANSWER

    def make_payload(reply_to: str | None) -> bytes:
        return encode({**request, "reply_to": reply_to} if reply_to else request)

    streamed: list[str] = []

    def print_chunk(payload: bytes) -> bool:
        doc = json.loads(payload)
        if not isinstance(doc, dict) or "seq" not in doc:
            return False
        streamed.append(doc["delta"])
        if not args.json:
            print(doc["delta"], end="", flush=True)
        return True

    return send_and_print("ask", mqtt_settings, topic, make_payload, args,
                          on_chunk=print_chunk if args.stream else None, streamed=streamed)


def cmd_snapshot(args: argparse.Namespace) -> int:
    from edge_agent import log
    from edge_agent.cameras.camera import Camera
    from edge_agent.cameras.camera_set import validate_cameras
    from edge_agent.errors import AgentError
    from edge_agent.cameras.images import encode_frame

    settings, _ = load(args.config)
    if args.camera not in settings.cameras:
        print(f"edge-agent snapshot: no camera {args.camera!r} in the settings "
              f"(configured: {', '.join(sorted(settings.cameras)) or 'none'})", file=sys.stderr)
        return EXIT_CONFIG
    validate_cameras(settings)
    log.configure(settings.log_level, settings.log_format, sys.stderr)  # stdout is the result
    camera = Camera(args.camera, settings.cameras[args.camera])
    try:
        frame = camera.snapshot()
    except AgentError as exc:
        print(f"edge-agent snapshot: {exc.code.value}: {exc.message}", file=sys.stderr)
        return EXIT_ERROR_ANSWER
    finally:
        camera.stop()
    output = Path(args.output or f"{args.camera}.jpg")
    # Full size: this is for aiming the camera, not for the model.
    output.write_bytes(encode_frame(frame.image, settings.images.model_copy(update={"longest_side": 8192})))
    print(f"{output}: {frame.width}x{frame.height}, frame {frame.seq}, age {frame.age_ms():.0f} ms")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers: dict[str, Handler] = {"run": cmd_run, "check-config": cmd_check_config, "ask": cmd_ask,
                                    "snapshot": cmd_snapshot, **MODEL_HANDLERS, **WATCH_HANDLERS, **EVENT_HANDLERS}
    try:
        return handlers[args.command](args)
    except ConfigError as exc:  # from any command: the settings, the cameras, the daemon's start
        return config_error(exc)
