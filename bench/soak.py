#!/usr/bin/env python3
"""Soak: a long stream of requests while the broker restarts and the daemon is killed, counted
by request id. Exit status 1 if any request is lost or gets two different answers.

    python bench/soak.py [--requests 1000] [--broker-restarts 20] [--agent-kills 20]
                         [--broker-signals mix|term|kill] [--gap-ms 30] [--seed 1] [--json]

A private mosquitto (persistence on, autosave every second), `edge-agent run` with the tiny test
model as a subprocess, and the fault tests' pipeline (tests/faults.py): QoS 1 both ways on a
persistent session, `busy` answers sent again after retry_after_ms, and every request still
unanswered after a quiet spell published again with the same id (a SIGKILLed mosquitto forgets
what it PUBACKed since its last autosave). Faults are spread evenly over the stream in a
seeded random order: broker restarts alternate SIGTERM and SIGKILL (or use one of them,
--broker-signals); a daemon kill is SIGKILL and a restart of the same device (same settings
and state_dir), the stream going on while it starts. Words in the report are those of
tests/faults.py; results and how to read them in bench/SOAK.md.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # reuse the tests' broker, agent process and pipeline

from faults import Pipeline, runs_per_id  # noqa: E402
from support import AgentProcess, Broker, Client, build_model  # noqa: E402

ANSWER_WAIT_S = 600.0
REPUBLISH_AFTER_S = 5.0
READY_WAIT_S = 60.0


def schedule(requests: int, broker_restarts: int, agent_kills: int, seed: int,
             signals: str = "mix") -> dict[int, str]:
    """Request index -> fault, evenly spaced, kinds in a seeded random order."""
    kinds = [f"broker_{signals}" if signals != "mix" else ("broker_term" if n % 2 == 0 else "broker_kill")
             for n in range(broker_restarts)]
    kinds += ["agent_kill"] * agent_kills
    random.Random(seed).shuffle(kinds)
    return {(k + 1) * requests // (len(kinds) + 1): kind for k, kind in enumerate(kinds)}


def soak(args: argparse.Namespace) -> dict[str, Any]:
    model = build_model("tiny")
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    broker = Broker(persistence=True)
    broker.start()
    agent: AgentProcess | None = None
    pipeline: Pipeline | None = None
    done = {"broker_term": 0, "broker_kill": 0, "agent_kill": 0}
    try:
        watcher = Client(broker.port)
        agent = AgentProcess(workdir, broker.port, model, limits__queue_size=64, mqtt__keepalive=5)
        agent.start(watcher)
        watcher.close()
        pipeline = Pipeline(broker.port, agent.request_topic, agent.response_topic)
        faults = schedule(args.requests, args.broker_restarts, args.agent_kills, args.seed,
                          args.broker_signals)
        started = time.monotonic()
        for i in range(args.requests):
            kind = faults.get(i)
            if kind == "broker_term":
                broker.restart(signal.SIGTERM)
            elif kind == "broker_kill":
                broker.restart(signal.SIGKILL)
            elif kind == "agent_kill":
                wait_ready(agent, starts=done["agent_kill"] + 1)  # each kill hits a running agent
                agent.restart(wait_ready=False)
            if kind:
                done[kind] += 1
                log(f"{i}: {kind}")
            pipeline.send(f"soak-{i}", f"question {i}")
            time.sleep(args.gap_ms / 1000)
        log("stream sent; waiting for the last answers")
        pipeline.wait_answers(ANSWER_WAIT_S, republish_after=REPUBLISH_AFTER_S)
        pipeline.settle(2.0)
        wall_s = time.monotonic() - started
        tally = pipeline.tally()
        lines = agent.log_lines()
        runs = runs_per_id(lines)
        republished = [line for line in lines if line.get("event") == "request.duplicate" and line.get("answered")
                       and not line.get("answer_on_its_way") and not line.get("answer_confirmed")]
        alive = agent.proc is not None and agent.proc.poll() is None
        return {
            **{k: v for k, v in tally.__dict__.items()},
            "broker_restarts": done["broker_term"] + done["broker_kill"],
            "broker_sigterm": done["broker_term"], "broker_sigkill": done["broker_kill"],
            "agent_kills": done["agent_kill"],
            "agent_starts_ready": sum(1 for line in lines if line.get("event") == "agent.ready"),
            "agent_alive_at_end": alive,
            "ran_twice": sum(1 for rid, n in runs.items() if n > 1 and rid.startswith("soak-")),
            "outbox_replayed": sum(int(line.get("count", 0)) for line in lines if line.get("event") == "outbox.replay"),
            "redelivered_requests": sum(1 for line in lines if line.get("event") == "request.duplicate"),
            # of which the stored answer was published again (neither on its way nor confirmed
            # to a broker re-send): each is a copy unless the broker had lost that answer
            "answers_republished": sum(1 for line in republished),
            "of_which_without_dup": sum(1 for line in republished if not line.get("dup_flag")),
            "wall_s": round(wall_s, 1),
        }
    finally:
        if pipeline is not None:
            pipeline.close()
        if agent is not None and agent.proc is not None and agent.proc.poll() is None:
            agent.stop()
        broker.close()


def wait_ready(agent: AgentProcess, starts: int) -> None:
    deadline = time.monotonic() + READY_WAIT_S
    while agent.count_events("agent.ready") < starts:
        if time.monotonic() > deadline:
            raise TimeoutError("the restarted agent did not become ready")
        time.sleep(0.05)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--broker-restarts", type=int, default=20)
    parser.add_argument("--agent-kills", type=int, default=20)
    parser.add_argument("--gap-ms", type=float, default=30.0, help="pause between two requests")
    parser.add_argument("--broker-signals", choices=("mix", "term", "kill"), default="mix",
                        help="how the broker is stopped: SIGTERM and SIGKILL in turn, or one of them")
    parser.add_argument("--seed", type=int, default=1, help="order of the faults")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()
    result = soak(args)
    if args.json:
        print(json.dumps(result))
    else:
        width = max(map(len, result))
        for key, value in result.items():
            print(f"{key:<{width}}  {value}")
    ok = (result["lost"] == 0 and result["duplicated"] == 0 and result["errors"] == 0
          and result["answered"] == result["sent"] and result["agent_alive_at_end"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
