"""`edge-agent events`: the running agent's event history over MQTT (a `history` request), and
`--snapshot ID --out FILE`, which copies a kept snapshot out of the local state dir. Parsing and
printing only."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from typing import Any

from edge_agent.cli.common import EXIT_ERROR_ANSWER, EXIT_USAGE, Handler, broker_context, load, send_and_print

EXIT_OK = 0


def add_parsers(commands: Any, config_help: str) -> None:
    events = commands.add_parser(
        "events", help="the rule events the agent kept (its history), newest first",
        description="Asks the running agent over MQTT for its event history. With --snapshot ID "
        "--out FILE it reads nothing over MQTT: it copies the snapshot from the local state dir "
        "(state_dir/history/ID.jpg of the settings), so run it on the agent's box.")
    events.add_argument("--rule", help="only this rule's events")
    events.add_argument("--camera", help="only this camera's events")
    events.add_argument("--since", help="from this time (ISO 8601 with Z, or a date)")
    events.add_argument("--until", help="before this time (ISO 8601 with Z, or a date: through that day)")
    events.add_argument("--limit", type=int, help="at most this many (1-500, default 50)")
    events.add_argument("--snapshot", metavar="ID", help="write this event's snapshot (its id) to --out")
    events.add_argument("--out", metavar="FILE", help="where --snapshot writes the JPEG")
    events.add_argument("--config", help=config_help)
    events.add_argument("--host", help="broker host (overrides the settings)")
    events.add_argument("--port", type=int, help="broker port (overrides the settings)")
    events.add_argument("--json", action="store_true", help="print the whole answer as JSON")
    events.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (default 30)")


def cmd_events(args: argparse.Namespace) -> int:
    if args.snapshot is not None or args.out is not None:
        return _write_snapshot(args)
    from edge_agent.protocol import encode

    _, mqtt, topics = broker_context(args)
    query = {key: value for key, value in (("rule", args.rule), ("camera", args.camera), ("since", args.since),
                                           ("until", args.until), ("limit", args.limit)) if value is not None}

    def make_payload(reply_to: str | None) -> bytes:
        return encode({"history": query, **({"reply_to": reply_to} if reply_to else {})})

    return send_and_print("events", mqtt, topics.request, make_payload, args, show=_print_events)


def _print_events(answer: dict[str, Any]) -> None:
    for event in answer["events"]:
        value = json.dumps(event["json"], ensure_ascii=False) if "json" in event else event["text"]
        snapshot = f"  snapshot {event['snapshot']['id']}" if event.get("snapshot") else ""
        print(f"{event['at']}  {event['rule']}  {event['camera']}  {event['trigger']}  {value}{snapshot}")
    print(f"{answer['count']} of {answer['matched']} events")


def _write_snapshot(args: argparse.Namespace) -> int:
    from edge_agent.delivery.history import images_folder, snapshot_file

    if args.snapshot is None or args.out is None:
        print("edge-agent events: --snapshot ID and --out FILE go together", file=sys.stderr)
        return EXIT_USAGE
    settings, _ = load(args.config)
    folder = images_folder(settings.state_dir)
    source = snapshot_file(folder, args.snapshot)
    if source is None:
        print(f"edge-agent events: {args.snapshot[:80]!r} is not a snapshot id", file=sys.stderr)
        return EXIT_USAGE
    try:
        shutil.copyfile(source, args.out)
    except FileNotFoundError:
        print(f"edge-agent events: no snapshot {args.snapshot} in {folder} (deleted with its event, "
              "or the event had none)", file=sys.stderr)
        return EXIT_ERROR_ANSWER
    except OSError as exc:
        print(f"edge-agent events: cannot copy {source} to {args.out}: {exc}", file=sys.stderr)
        return EXIT_ERROR_ANSWER
    print(f"{args.out}: snapshot {args.snapshot}, {source.stat().st_size} bytes")
    return EXIT_OK


HANDLERS: dict[str, Handler] = {"events": cmd_events}
