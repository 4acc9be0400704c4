"""What the commands share: loading the settings, printing a configuration error (exit 78),
sending one request and printing its answer. Imports nothing of cli/."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any, Callable

from edge_agent.errors import EXIT_CONFIG, ConfigError

if TYPE_CHECKING:
    from edge_agent.settings.files import ConfigSources
    from edge_agent.settings.model import Settings

EXIT_ANSWERED, EXIT_ERROR_ANSWER, EXIT_NO_ANSWER = 0, 1, 2
EXIT_USAGE = 64  # sysexits EX_USAGE: options that do not go together
Handler = Callable[[argparse.Namespace], int]


def load(config: str | None) -> tuple[Settings, ConfigSources]:
    """The settings snapshot and where it came from. A ConfigError goes up to `main`, which
    prints it (config_error) and exits 78."""
    from edge_agent.settings.files import load_settings  # here: --help and --version stay fast

    return load_settings(config)


def broker_context(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(settings, their MQTT settings with --host/--port applied, this agent's Topics)."""
    from edge_agent.protocol import Topics

    settings, _ = load(args.config)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    mqtt = settings.mqtt.model_copy(update=overrides)
    return settings, mqtt, Topics(mqtt.topic_prefix, settings.device_id)


def config_error(exc: ConfigError) -> int:
    """Each problem on stderr as `config error: ...`; the exit code for them."""
    for problem in exc.problems:
        print(f"config error: {problem}", file=sys.stderr)
    return EXIT_CONFIG


def send_and_print(command: str, mqtt_settings: Any, topic: str, make_payload: Any, args: argparse.Namespace,
                   on_chunk: Any = None, streamed: list[str] | None = None,
                   show: Callable[[dict[str, Any]], None] | None = None) -> int:
    """Send one request, print its answer (`--json`: all of it; else `show(answer)`, or the text
    or JSON value; errors on stderr) and return the exit code."""
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
    elif answer.get("ok") and show is not None:
        show(answer)
    elif answer.get("ok") and streamed:
        # Streamed: the rest of the text (all of it if chunks were lost).
        shown = "".join(streamed)
        print(answer["text"][len(shown):] if answer["text"].startswith(shown) else "\n" + answer["text"])
    elif answer.get("ok"):
        print(json.dumps(answer["json"], ensure_ascii=False) if "json" in answer else answer["text"])
    else:
        print(f"error {answer['error']['code']}: {answer['error']['message']}", file=sys.stderr)
    return EXIT_ANSWERED if answer.get("ok") else EXIT_ERROR_ANSWER
