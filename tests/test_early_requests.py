"""Requests a resumed broker session delivers while the model loads: held in order up to a
bound, the rest answered `busy` at once (a QoS 0 flood must not grow the daemon without end)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from faults import fault_hooks_env
from support import AgentProcess, Broker, Client

FLOOD = 400


def test_a_flood_while_the_model_loads_is_held_up_to_a_bound_and_the_rest_is_busy(
        broker: Broker, client: Client, start_agent: Callable[..., AgentProcess], tmp_path: Path) -> None:
    # a queue with room for every held request: what is refused is refused by the bound alone
    agent = start_agent(broker, client, device_id="early", limits__queue_size=100,
                        env=fault_hooks_env(tmp_path / "hooks", slow_load_s=6.0))
    assert agent.stop() == 0  # the broker keeps its session and subscription
    answers: dict[str, list[dict[str, Any]]] = {}
    states: list[str] = []
    busy_while: list[str] = []  # the agent's state when each `busy` came
    client.subscribe(agent.response_topic)

    agent.start(client, wait_ready=False)
    starting = client.wait_for(lambda d: d.get("device_id") == "early" and d.get("state") == "starting", 30)
    assert starting["state"] == "starting"
    sent_at = time.monotonic()
    for n in range(FLOOD):
        client.client.publish(agent.request_topic, json.dumps({"id": f"f{n}", "prompt": "hi", "max_tokens": 2}), qos=0)

    def seen(doc: dict[str, Any]) -> bool:
        if "state" in doc and doc.get("device_id") == "early":
            states.append(doc["state"])
        if str(doc.get("id", "")).startswith("f"):
            answers.setdefault(doc["id"], []).append(doc)
            if not doc["ok"]:
                busy_while.append(states[-1] if states else "starting")
                assert "starting" in doc["error"]["message"], doc
        return len(answers) == FLOOD

    client.wait_for(seen, 90)
    busy = [docs[0] for docs in answers.values() if not docs[0]["ok"]]
    assert busy and all(doc["error"]["code"] == "busy" for doc in busy), busy[:3]
    held = FLOOD - len(busy)
    assert held == 64, held  # work.intake.EARLY_MAX
    assert set(busy_while) == {"starting"}, "refused at once, not after the model loaded"
    assert all(len(docs) == 1 for docs in answers.values())
    assert all(docs[0]["ok"] for docs in answers.values() if docs[0] not in busy)
    assert time.monotonic() - sent_at < 90
