"""The event history from the outside: a real mosquitto, the tiny vision model on real ORT
GenAI, a camera reading an ffmpeg-made clip; rules publish, the agent keeps their events and
snapshots, and answers queries, the CLI and questions over them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from support import REPO, AgentProcess, Broker, Client, ask, collect, file_camera as camera, next_stats
from test_history_unit import BAD_FILTERS
from video import make_still_clip


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_still_clip(tmp_path_factory.mktemp("scene") / "still.avi", seconds=4, size="320x240")


@pytest.fixture
def start(start_agent: Callable[..., AgentProcess], broker: Broker, client: Client, vision_model: Path,
          clip: Path) -> Callable[..., AgentProcess]:
    def run(**overrides: Any) -> AgentProcess:
        overrides.setdefault("images__longest_side", 336)
        overrides.setdefault("stats_interval_s", 1)
        overrides.setdefault("cameras", {"yard": camera(clip)})
        return start_agent(broker, client, model=vision_model, **overrides)

    return run


def door_rule(every_s: float = 1.0, **extra: Any) -> dict[str, Any]:
    return {"door": {"camera": "yard", "prompt": "Is the door open?", "every_s": every_s, "max_tokens": 4,
                     "publish": "always", **extra}}


def state_dir(agent: AgentProcess) -> Path:
    return Path(agent.data["state_dir"])


def snapshots(agent: AgentProcess) -> list[str]:
    folder = state_dir(agent) / "history"
    return sorted(p.stem for p in folder.iterdir()) if folder.is_dir() else []


def history(client: Client, agent: AgentProcess, **query: Any) -> dict[str, Any]:
    return ask(client, agent, {"history": query})


def wait_events(client: Client, agent: AgentProcess, count: int, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        answer = history(client, agent)
        if answer["matched"] >= count or time.monotonic() > deadline:
            return answer
        time.sleep(0.5)


def cli(agent: AgentProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent", "events", *args, "--config", str(agent.config)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def settled(client: Client, agent: AgentProcess, quiet_s: float = 1.5, timeout: float = 30) -> dict[str, Any]:
    """The history once no new event came for `quiet_s` (after the rules were switched off)."""
    deadline, last = time.monotonic() + timeout, history(client, agent)
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = history(client, agent)
        if now["events"] == last["events"]:
            return now
        last = now
    raise TimeoutError("the history kept changing")


def test_events_are_kept_as_rules_publish_and_answered_newest_first_without_images(
        start: Callable[..., AgentProcess], client: Client, tmp_path: Path) -> None:
    agent = start(watch=door_rule(), history__max_events=3, reload_debounce_s=0.2)
    client.subscribe(agent.response_topic)
    client.subscribe(f"{agent.prefix}/{agent.device_id}/watch/door")
    states = [p for _, t, p in collect(client, 5.5) if t.endswith("/watch/door")]
    assert len(states) >= 4 and all(b"jpeg_base64" not in p for p in states)  # never in the state
    assert all(json.loads(p)["frames"][0]["camera"] == "yard" for p in states)
    client.client.unsubscribe(f"{agent.prefix}/{agent.device_id}/watch/door")  # its clearing is empty
    agent.rewrite(watch=door_rule(enabled=False))  # hot reload: the rule stops, the history stays
    answer = settled(client, agent)
    assert answer["ok"] is True and answer["count"] == answer["matched"] == 3, answer  # the count bound
    events = answer["events"]
    assert [e["at"] for e in events] == sorted((e["at"] for e in events), reverse=True)
    topic = f"{agent.prefix}/{agent.device_id}/watch/door/snapshot"
    assert all(e["rule"] == "door" and e["camera"] == "yard" and e["trigger"] == "schedule"
               and e["id"].startswith("watch-door-") and e["snapshot"] == {"id": e["id"], "topic": topic}
               for e in events), events
    assert all(e["text"] == json.loads(states[-1])["text"] for e in events)  # greedy, same frame
    assert "jpeg_base64" not in json.dumps(answer)
    assert snapshots(agent) == sorted(e["id"] for e in events)  # the oldest went with their events
    assert history(client, agent, rule="gate")["matched"] == 0
    assert history(client, agent, since="2999-01-01")["events"] == []
    assert history(client, agent, until=events[1]["at"])["events"] == events[2:]

    # each bad filter, and model fields on a query: bad_request naming the field, and the next
    # request is answered
    bad_ones = [({"rule": "door", "since": "last week"}, "history.since 'last week' is not an ISO 8601 time"),
                *BAD_FILTERS]
    for n, (value, words) in enumerate(bad_ones):
        bad = ask(client, agent, {"id": f"bad-filter-{n}", "history": value})
        assert bad["ok"] is False and bad["error"]["code"] == "bad_request", bad
        assert words in bad["error"]["message"], bad
        assert history(client, agent, limit=1)["events"] == events[:1]
    bad = ask(client, agent, {"id": "bad-query", "history": {}, "max_tokens": 5})
    assert bad["error"]["code"] == "bad_request" and "not 'max_tokens'" in bad["error"]["message"], bad
    assert history(client, agent, limit=1)["events"] == events[:1]

    # the CLI: JSON, text, and a snapshot written out
    listing = cli(agent, "--rule", "door", "--json")
    assert listing.returncode == 0, listing.stderr
    assert json.loads(listing.stdout)["events"] == events
    text = cli(agent, "--rule", "door", "--limit", "2")
    assert text.returncode == 0, text.stderr
    assert text.stdout == "".join(f"{e['at']}  door  yard  schedule  {e['text']}  snapshot {e['id']}\n"
                                  for e in events[:2]) + "2 of 3 events\n"
    out = tmp_path / "snap.jpg"
    wrote = cli(agent, "--snapshot", events[0]["id"], "--out", str(out))
    assert wrote.returncode == 0, wrote.stderr
    assert out.read_bytes() == (state_dir(agent) / "history" / f"{events[0]['id']}.jpg").read_bytes()
    assert out.read_bytes()[:2] == b"\xff\xd8" and out.stat().st_size > 1000
    gone = cli(agent, "--snapshot", "watch-door-000000000000", "--out", str(out))
    assert gone.returncode == 1 and "no snapshot watch-door-000000000000" in gone.stderr
    odd = cli(agent, "--snapshot", "../edge-agent.db", "--out", str(out))
    assert odd.returncode == 64 and "is not a snapshot id" in odd.stderr

    # a lower bound by hot reload holds at once, not at the next event (the rule is off)
    agent.rewrite(history__max_events=2)
    deadline = time.monotonic() + 15
    while history(client, agent)["matched"] != 2 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert history(client, agent)["events"] == events[:2] and snapshots(agent) == sorted(e["id"] for e in events[:2])


def test_a_question_over_the_history_gets_the_events_as_context_and_says_how_many(
        start: Callable[..., AgentProcess], client: Client) -> None:
    agent = start(watch=door_rule(), history__max_events=3)
    client.subscribe(agent.response_topic)
    assert wait_events(client, agent, 3)["matched"] == 3
    plain = ask(client, agent, {"prompt": "Was the door open at night?", "max_tokens": 4})
    asked = ask(client, agent, {"id": "q-history", "history": {"rule": "door"},
                                "prompt": "Was the door open at night?", "max_tokens": 4})
    assert asked["ok"] is True and asked["history"] == {"events_given": 3, "events_matched": 3}, asked
    assert isinstance(asked["text"], str) and asked["usage"]["completion_tokens"] >= 1
    # the model received the events: each line of context costs tokens
    assert asked["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 3 * 10, (asked, plain)
    context = [line for line in agent.log_lines()
               if line.get("event") == "history.context" and line.get("request_id") == "q-history"]
    assert context and context[0]["given"] == 3 and context[0]["matched"] == 3
    assert context[0]["chars"] <= 16000
    none = ask(client, agent, {"history": {"rule": "gate"}, "prompt": "Was the gate open?", "max_tokens": 2})
    assert none["ok"] is True and none["history"] == {"events_given": 0, "events_matched": 0}


def test_an_agent_without_history_says_so_and_answers_the_next(
        start: Callable[..., AgentProcess], client: Client) -> None:
    agent = start(watch=door_rule(), history__enabled=False)
    client.subscribe(agent.response_topic)
    for request in ({"history": {"rule": "door"}},
                    {"history": {}, "prompt": "Was the door open?", "max_tokens": 2}):
        refused = ask(client, agent, request)
        assert refused["ok"] is False and refused["error"]["code"] == "unsupported", refused
        assert "[history] enabled = false" in refused["error"]["message"], refused
        assert ask(client, agent, {"prompt": "Hello", "max_tokens": 2})["ok"]
    assert snapshots(agent) == []


def test_bounds_by_count_bytes_and_age_hold_across_restarts(
        start: Callable[..., AgentProcess], broker: Broker, client: Client) -> None:
    agent = start(watch=door_rule(every_s=0.5))
    client.subscribe(agent.response_topic)
    assert wait_events(client, agent, 4)["matched"] >= 4
    agent.stop()
    # count: restarted with a lower bound and the rule off, the oldest go at start, files too
    agent.rewrite(watch=door_rule(every_s=0.5, enabled=False), history__max_events=2)
    agent.restart()
    kept = history(client, agent)
    assert kept["matched"] == 2 and snapshots(agent) == sorted(e["id"] for e in kept["events"])
    stats = next_stats(broker.port, agent)["history"]
    assert stats["events"] == 2 and stats["degraded"] is False, stats
    # bytes: room for one event (each is its row and its JPEG)
    agent.stop()
    agent.rewrite(history__max_mb=(stats["bytes"] * 0.75) / 1_000_000)
    agent.restart()
    left = history(client, agent)
    assert left["matched"] == 1 and left["events"][0]["id"] == kept["events"][0]["id"]  # the newest stays
    assert snapshots(agent) == [kept["events"][0]["id"]]
    # age: nothing is younger than a second
    agent.stop()
    time.sleep(1.2)
    agent.rewrite(history__max_age_days=1 / 86400)
    agent.restart()
    assert history(client, agent)["matched"] == 0 and snapshots(agent) == []


def test_a_failing_history_disk_never_costs_a_rule_its_state(
        start: Callable[..., AgentProcess], broker: Broker, client: Client, tmp_path: Path) -> None:
    device = "dev-history-broken"
    folder = tmp_path / f"state-{device}"
    folder.mkdir()
    (folder / "history").write_text("a file where the snapshot folder should be")
    agent = start(device_id=device, watch=door_rule())
    client.subscribe(agent.response_topic)
    client.subscribe(f"{agent.prefix}/{agent.device_id}/watch/door")
    states = [p for _, t, p in collect(client, 4.5) if t.endswith("/watch/door")]
    assert len(states) >= 3  # every run's state went out
    info = next_stats(broker.port, agent)["history"]
    assert info["degraded"] is True and info["write_failures"] >= 3 and info["events"] == 0, info
    failed = [line for line in agent.log_lines() if line.get("event") == "history.write_failed"]
    assert len(failed) == 1 and "history" in failed[0]["error"], failed  # once per episode
    assert history(client, agent)["matched"] == 0  # queries still answer
    assert ask(client, agent, {"prompt": "Hello", "max_tokens": 2})["ok"] is True
