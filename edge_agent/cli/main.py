"""Command line: argument parsing and exit codes; nothing else."""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path
from typing import Any

from edge_agent import __version__
from edge_agent.cli.models import HANDLERS as MODEL_HANDLERS, add_parsers as add_model_commands
from edge_agent.cli.watch import HANDLERS as WATCH_HANDLERS, add_parsers as add_watch_commands
from edge_agent.errors import EXIT_CONFIG

EXIT_ANSWERED, EXIT_ERROR_ANSWER, EXIT_NO_ANSWER = 0, 1, 2
EXIT_USAGE = 64  # sysexits EX_USAGE: options that do not go together


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
    return parser


def _load(config: str | None, with_sources: bool = False) -> Any:
    from edge_agent.errors import ConfigError
    from edge_agent.settings.files import load_settings

    try:
        settings, sources = load_settings(config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return (None, None) if with_sources else None
    return (settings, sources) if with_sources else settings


def cmd_check_config(args: argparse.Namespace) -> int:
    from edge_agent.cameras.camera import validate_cameras
    from edge_agent.errors import ConfigError
    from edge_agent.settings.files import describe_settings, explain_settings

    settings, sources = _load(args.config, with_sources=True)
    if settings is None:
        return EXIT_CONFIG
    try:
        validate_cameras(settings)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    if args.explain:
        rows = explain_settings(settings, sources)
        width = max(len(key) for key, _, _ in rows)
        for key, value, origin in rows:
            print(f"{key:<{width}}  {json.dumps(value):<30}  # {origin}")
        return 0
    files = ", ".join(str(f) for f in sources.files) or "defaults"
    print(f"# settings from {files} and EDGE_AGENT_* environment")
    print(json.dumps(describe_settings(settings), indent=2))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from edge_agent import log
    from edge_agent.daemon.main import run
    from edge_agent.errors import ConfigError

    settings, sources = _load(args.config, with_sources=True)
    if settings is None:
        return EXIT_CONFIG
    log.configure(settings.log_level, settings.log_format)
    try:
        return run(settings, sources)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:  # second Ctrl-C during shutdown
        return 130


def cmd_ask(args: argparse.Namespace) -> int:
    from edge_agent.protocol import Topics, encode

    settings = _load(args.config)
    if settings is None:
        return EXIT_CONFIG
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


def send_and_print(command: str, mqtt_settings: Any, topic: str, make_payload: Any, args: argparse.Namespace,
                   on_chunk: Any = None, streamed: list[str] | None = None) -> int:
    """Send one request, print its answer (`--json`: all of it; else the text or JSON value,
    errors on stderr) and return the exit code."""
    from edge_agent.errors import BrokerError
    from edge_agent.mqtt import ask_once

    try:
        raw = ask_once(mqtt_settings, topic, make_payload, args.timeout, on_chunk=on_chunk)
    except BrokerError as exc:
        print(f"edge-agent {command}: {exc}", file=sys.stderr)
        return EXIT_NO_ANSWER
    if raw is None:
        print(f"edge-agent {command}: no answer on {topic} within {args.timeout:g} s", file=sys.stderr)
        return EXIT_NO_ANSWER
    answer = json.loads(raw)
    if args.json:
        print(json.dumps(answer, indent=2, ensure_ascii=False))
    elif answer.get("ok") and streamed:
        # Streamed: the rest of the text (all of it if chunks were lost).
        shown = "".join(streamed)
        print(answer["text"][len(shown):] if answer["text"].startswith(shown) else "\n" + answer["text"])
    elif answer.get("ok"):
        print(json.dumps(answer["json"], ensure_ascii=False) if "json" in answer else answer["text"])
    else:
        print(f"error {answer['error']['code']}: {answer['error']['message']}", file=sys.stderr)
    return EXIT_ANSWERED if answer.get("ok") else EXIT_ERROR_ANSWER


def cmd_snapshot(args: argparse.Namespace) -> int:
    from edge_agent import log
    from edge_agent.cameras.camera import Camera, validate_cameras
    from edge_agent.errors import AgentError, ConfigError
    from edge_agent.cameras.images import encode_frame

    settings = _load(args.config)
    if settings is None:
        return EXIT_CONFIG
    if args.camera not in settings.cameras:
        print(f"edge-agent snapshot: no camera {args.camera!r} in the settings "
              f"(configured: {', '.join(sorted(settings.cameras)) or 'none'})", file=sys.stderr)
        return EXIT_CONFIG
    try:
        validate_cameras(settings)
    except ConfigError as exc:
        print("\n".join(f"config error: {p}" for p in exc.problems), file=sys.stderr)
        return EXIT_CONFIG
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
    handlers = {"run": cmd_run, "check-config": cmd_check_config, "ask": cmd_ask, "snapshot": cmd_snapshot,
                **MODEL_HANDLERS, **WATCH_HANDLERS}
    return handlers[args.command](args)
