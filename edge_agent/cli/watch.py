"""`edge-agent watch list` and `edge-agent watch run NAME`: parsing and printing only. Both ask
the running agent over MQTT: `list` reads the rules' retained state and the status document,
`run` sends the rule's request to the agent and prints the answer (no rule state is published)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from edge_agent.cli.common import Handler, broker_context, send_and_print
from edge_agent.errors import EXIT_CONFIG

EXIT_OK = 0


def add_parsers(commands: Any, config_help: str) -> None:
    watch = commands.add_parser("watch", help="watch rules: list them, run one now")
    sub = watch.add_subparsers(dest="watch_command", required=True)
    listing = sub.add_parser("list", help="rules, their last result and next run (from the broker)")
    run = sub.add_parser("run", help="run a rule once now through the agent and print the result; "
                         "publishes no rule state")
    run.add_argument("name", help="a [watch.<name>] rule")
    run.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (default 120)")
    for parser in (listing, run):
        parser.add_argument("--config", help=config_help)
        parser.add_argument("--host", help="broker host (overrides the settings)")
        parser.add_argument("--port", type=int, help="broker port (overrides the settings)")
        parser.add_argument("--json", action="store_true", help="print JSON")


def cmd_list(args: argparse.Namespace) -> int:
    from edge_agent.errors import BrokerError
    from edge_agent.mqtt import read_retained

    settings, mqtt, topics = broker_context(args)
    try:
        retained = read_retained(mqtt, [topics.watch("+"), topics.status])
        reachable = True
    except BrokerError as exc:
        print(f"edge-agent watch list: {exc}; showing the settings only", file=sys.stderr)
        retained, reachable = {}, False
    status = _json(retained.get(topics.status)) or {}
    live = status.get("watch") or {}
    rows = []
    for name, rule in settings.watch.items():
        state = _json(retained.get(topics.watch(name)))
        rows.append({"rule": name, "camera": rule.camera, "enabled": rule.enabled,
                     "every_s": rule.every_s, "on_motion": rule.on_motion, "publish": rule.publish,
                     "last": None if state is None else {k: state.get(k) for k in ("at", "json", "text", "changed")},
                     "next_at": (live.get(name) or {}).get("next_at"), "counts": live.get(name)})
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return EXIT_OK
    if not rows:
        print("no [watch.<name>] rules in the settings")
    for row in rows:
        trigger = " + ".join(t for t in (f"every {row['every_s']:g} s" if row["every_s"] else "",
                                         "on motion" if row["on_motion"] else "") if t)
        print(f"{row['rule']}: camera {row['camera']}, {trigger}, publish {row['publish']}"
              + ("" if row["enabled"] else " (disabled)"))
        last = row["last"]
        value = "unknown (broker unreachable)" if not reachable else "none yet" if last is None else \
            f"{json.dumps(last['json'] if 'json' in last and last['json'] is not None else last['text'], ensure_ascii=False)[:120]} at {last['at']}"
        print(f"  last result: {value}")
        print(f"  next run: {row['next_at'] or ('on motion' if row['on_motion'] else 'unknown')}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from edge_agent.protocol import encode
    from edge_agent.automation.watch import rule_fields

    settings, mqtt, topics = broker_context(args)
    rule = settings.watch.get(args.name)
    if rule is None:
        print(f"edge-agent watch run: no rule {args.name!r} (configured: "
              f"{', '.join(sorted(settings.watch)) or 'none'})", file=sys.stderr)
        return EXIT_CONFIG
    fields = rule_fields(args.name, rule)

    def make_payload(reply_to: str | None) -> bytes:
        return encode({**fields, "reply_to": reply_to} if reply_to else fields)

    return send_and_print("watch run", mqtt, topics.request, make_payload, args)


def _json(raw: bytes | None) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def cmd_watch(args: argparse.Namespace) -> int:
    return {"list": cmd_list, "run": cmd_run}[args.watch_command](args)


HANDLERS: dict[str, Handler] = {"watch": cmd_watch}
