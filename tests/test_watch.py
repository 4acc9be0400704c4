"""Watch rules from the outside: a real mosquitto, the tiny vision model on real ORT GenAI,
cameras reading ffmpeg-made clips (a still scene, and one that starts moving)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from faults import fault_hooks_env
from support import (DOOR_SCHEMA, REPO, AgentProcess, Broker, Client, collect, file_camera as camera,
                     first, next_stats, retained_status)
from video import make_motion_clip, make_still_clip




@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("scenes")
    return {"still": make_still_clip(folder / "still.avi", seconds=4, size="320x240"),
            "moving": make_motion_clip(folder / "moving.avi", still_s=4, moving_s=3, size="320x240")}


@pytest.fixture
def watcher(client: Client) -> Client:
    return client


@pytest.fixture
def start(start_agent: Callable[..., AgentProcess], broker: Broker, client: Client,
          vision_model: Path) -> Callable[..., AgentProcess]:
    def run(**overrides: Any) -> AgentProcess:
        overrides.setdefault("images__longest_side", 336)
        overrides.setdefault("stats_interval_s", 1)
        return start_agent(broker, client, model=vision_model, **overrides)

    return run


def watch_topic(agent: AgentProcess, rule: str) -> str:
    return f"{agent.prefix}/{agent.device_id}/watch/{rule}"


def test_a_still_scene_publishes_once_and_always_publishes_every_run(
        start: Callable[..., AgentProcess], broker: Broker, watcher: Client, clips: dict[str, Path]) -> None:
    agent = start(cameras={"yard": camera(clips["still"])}, watch={
        "door": {"camera": "yard", "prompt": "Is the door open?", "every_s": 1, "max_tokens": 12,
                 "response_format": DOOR_SCHEMA, "change_key": "open"},
        "scene": {"camera": "yard", "prompt": "Describe the yard.", "every_s": 1, "max_tokens": 6,
                  "publish": "always"}})
    watcher.subscribe(f"{agent.prefix}/{agent.device_id}/#")
    messages = collect(watcher, 6.5)
    door = [json.loads(p) for _, t, p in messages if t == watch_topic(agent, "door")]
    scene = [json.loads(p) for _, t, p in messages if t == watch_topic(agent, "scene")]
    events = [json.loads(p) for _, t, p in messages if t.endswith("/events")]
    counts = next_stats(broker.port, agent)["watch"]
    # change: the first run publishes, greedy runs on identical frames never change
    assert len(door) == 1, door
    assert counts["door"]["runs"] >= 4 and counts["door"]["published"] == 1, counts
    state = door[0]
    assert set(state["json"]) == {"open"} and isinstance(state["json"]["open"], bool)
    assert state["rule"] == "door" and state["changed"] is True and state["previous"] is None
    assert state["frames"][0]["camera"] == "yard" and state["timings"]["total_ms"] > 0
    assert [e for e in events if e["rule"] == "door"] == [
        {"rule": "door", "at": state["at"], "json": state["json"], "previous": None, "snapshot": state["snapshot"]}]
    assert state["snapshot"]["id"].startswith("watch-door-") and "jpeg_base64" not in state["frames"][0]
    # always: every run publishes; after the first, nothing changed
    assert len(scene) >= 4 and counts["scene"]["failed"] == 0
    assert all(s["changed"] is False and s["previous"] == scene[0]["text"] for s in scene[1:]), scene
    assert len({s["text"] for s in scene}) == 1
    assert len([e for e in events if e["rule"] == "scene"]) == 1


def test_motion_turns_on_and_triggers_the_rule_a_still_camera_never_does(
        start: Callable[..., AgentProcess], broker: Broker, watcher: Client, clips: dict[str, Path]) -> None:
    agent = start(cameras={"drive": camera(clips["moving"], motion=True), "yard": camera(clips["still"], motion=True)},
                  watch={"arrival": {"camera": "drive", "prompt": "Who came?", "on_motion": True, "max_tokens": 4,
                                     "cooldown_s": 30},
                         "quiet": {"camera": "yard", "prompt": "Who came?", "on_motion": True, "max_tokens": 4}})
    base = f"{agent.prefix}/{agent.device_id}"
    watcher.subscribe(f"{base}/#")
    messages = collect(watcher, 14)  # the moving clip loops every 7 s: movement starts twice
    drive = [(at, p) for at, t, p in messages if t == f"{base}/camera/drive/motion"]
    assert b"ON" in [p for _, p in drive], drive
    on_at = next(at for at, p in drive if p == b"ON")
    runs = [(at, json.loads(p)) for at, t, p in messages if t == watch_topic(agent, "arrival")]
    assert runs, "the on_motion rule never ran"
    ran_at, state = runs[0]
    started_after_on_s = ran_at - state["timings"]["total_ms"] / 1000 - on_at
    assert started_after_on_s < 2.0, started_after_on_s
    assert state["trigger"] == "motion"
    assert len(runs) == 1  # the second movement fell within cooldown_s
    # the still camera: its motion state is OFF (retained) and its rule never ran
    assert all(p == b"OFF" for _, t, p in messages if t == f"{base}/camera/yard/motion")
    assert not [t for _, t, _ in messages if t == watch_topic(agent, "quiet")]
    info = next_stats(broker.port, agent)
    assert retained_status(broker.port, agent)["cameras"]["yard"]["motion"] == "OFF"
    assert info["watch"]["quiet"]["runs"] == 0 and info["watch"]["arrival"]["skipped_cooldown"] >= 1


def test_rule_runs_never_make_requests_busy_and_requests_go_first(
        start: Callable[..., AgentProcess], broker: Broker, watcher: Client, clips: dict[str, Path],
        tmp_path: Path) -> None:
    """One inference slot, room for exactly 10 waiting requests, a rule due every 0.5 s. A SLOW
    request (a second more: the fault hooks) holds the slot while a rule run gets queued; then 10
    requests arrive: all are taken (none `busy`) and all run before the queued rule run."""
    agent = start(cameras={"yard": camera(clips["still"])}, inference__max_batch=1, limits__queue_size=10,
                  env=fault_hooks_env(tmp_path / "hooks"),
                  watch={"often": {"camera": "yard", "prompt": "Anything?", "every_s": 0.5,
                                   "max_tokens": 4, "publish": "always"}})
    watcher.subscribe(agent.response_topic)
    time.sleep(1.5)  # rule runs under way
    watcher.publish(agent.request_topic, json.dumps({"id": "slow", "prompt": "SLOW hello", "max_tokens": 2}))
    time.sleep(0.7)  # the rule fell due while the slot was taken: its run waits in the queue
    ids = [f"r{n}" for n in range(10)]
    for rid in ids:
        watcher.publish(agent.request_topic, json.dumps({"id": rid, "prompt": "Hello", "max_tokens": 8}))
    answers = {}
    while len(answers) < len(ids) + 1:
        doc = watcher.wait_for(lambda d: d.get("id") in ids + ["slow"], timeout=120)
        answers[doc["id"]] = doc
    assert all(a["ok"] for a in answers.values()), [a for a in answers.values() if not a["ok"]]
    deadline = time.monotonic() + 10
    while True:  # the rule run that waited finishes after the last answer went out
        lines = agent.log_lines()
        done = [str(line.get("request_id")) for line in lines if line.get("event") == "request.done"]
        slow_at = done.index("slow")
        waiting = [line["request_id"] for line in lines if line.get("event") == "watch.run"
                   and line["request_id"] in done[slow_at:]]
        if waiting or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert waiting, "no rule run was queued while the slot was taken"
    last_request = max(done.index(rid) for rid in ids)
    assert done.index(waiting[0]) > last_request, done  # it waited behind all ten
    counts = next_stats(broker.port, agent)["watch"]["often"]
    assert counts["skipped_running"] >= 1, counts  # due again while it waited: skipped, counted


def test_a_rule_edited_in_the_file_takes_effect_without_a_restart(
        start: Callable[..., AgentProcess], watcher: Client, clips: dict[str, Path]) -> None:
    agent = start(cameras={"yard": camera(clips["still"])}, reload_debounce_s=0.2,
                  watch={"old": {"camera": "yard", "prompt": "Anything?", "every_s": 1, "max_tokens": 4}})
    watcher.subscribe(f"{agent.prefix}/{agent.device_id}/watch/#")
    first(watcher, watch_topic(agent, "old"))
    pid = agent.proc.pid
    data = json.loads(json.dumps(agent.data))
    data["watch"] = {"new": {"camera": "yard", "prompt": "Anything new?", "every_s": 1, "max_tokens": 4,
                             "publish": "always"}}
    agent.data = data
    agent.rewrite()
    messages = collect(watcher, 6)
    cleared = [p for _, t, p in messages if t == watch_topic(agent, "old")]
    assert cleared and cleared[-1] == b"", cleared  # the removed rule's retained state is gone
    assert len([t for _, t, _ in messages if t == watch_topic(agent, "new")]) >= 2
    assert agent.proc.pid == pid and agent.proc.poll() is None


@pytest.mark.parametrize("rule,words", [
    ({"camera": "nope", "prompt": "x", "every_s": 1}, "watch.r.camera: unknown camera 'nope'"),
    ({"camera": "yard", "prompt": "x"}, "give every_s, on_motion = true, or both"),
    ({"camera": "yard", "prompt": "x", "on_motion": True}, "has no motion detection"),
    ({"camera": "yard", "prompt": "x", "every_s": 1, "change_key": "open"}, "change_key"),
])
def test_invalid_rules_are_refused_at_start(tmp_path: Path, broker: Broker, vision_model: Path,
                                            clips: dict[str, Path], rule: dict[str, Any], words: str) -> None:
    agent = AgentProcess(tmp_path, broker.port, vision_model, cameras={"yard": camera(clips["still"])},
                         watch={"r": rule})
    result = subprocess.run([sys.executable, "-m", "edge_agent", "run", "--config", str(agent.config)],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 78 and words in result.stderr, result.stderr


def test_an_invalid_rule_on_reload_is_refused_and_the_running_rules_go_on(
        start: Callable[..., AgentProcess], broker: Broker, watcher: Client, clips: dict[str, Path]) -> None:
    agent = start(cameras={"yard": camera(clips["still"])}, reload_debounce_s=0.2,
                  watch={"ok": {"camera": "yard", "prompt": "Anything?", "every_s": 1, "max_tokens": 4,
                                "publish": "always"}})
    watcher.subscribe(agent.status_topic)
    agent.rewrite(watch={"ok": {"camera": "yard", "prompt": "Anything?", "every_s": 1, "max_tokens": 4,
                                "publish": "always"},
                         "bad": {"camera": "garage", "prompt": "x", "every_s": 1}})
    refused = watcher.wait_for(lambda d: d.get("device_id") == agent.device_id and d.get("config_error"), 15)
    assert refused["config_error"] == [f"{agent.config}: watch.bad.camera: unknown camera 'garage' (yard)"]
    before = next_stats(broker.port, agent)["watch"]
    assert set(before) == {"ok"}
    time.sleep(2.5)
    assert next_stats(broker.port, agent)["watch"]["ok"]["runs"] >= before["ok"]["runs"] + 2


def test_watch_list_and_watch_run(start: Callable[..., AgentProcess], watcher: Client, clips: dict[str, Path]) -> None:
    agent = start(cameras={"yard": camera(clips["still"])},
                  watch={"door": {"camera": "yard", "prompt": "Is the door open?", "every_s": 60,
                                  "max_tokens": 12, "response_format": DOOR_SCHEMA, "change_key": "open"},
                         "later": {"camera": "yard", "prompt": "x", "every_s": 5, "enabled": False}})
    watcher.subscribe(watch_topic(agent, "door"))
    state = json.loads(first(watcher, watch_topic(agent, "door"))[1])

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "edge_agent", "watch", *args, "--config", str(agent.config)],
                              capture_output=True, text=True, cwd=REPO, timeout=120)

    listing = cli("list", "--json")
    assert listing.returncode == 0, listing.stderr
    rows = {row["rule"]: row for row in json.loads(listing.stdout)}
    assert rows["door"]["last"]["json"] == state["json"] and rows["door"]["last"]["at"] == state["at"]
    assert rows["door"]["next_at"] is not None and rows["later"]["enabled"] is False
    text = cli("list")
    assert "door: camera yard, every 60 s, publish change" in text.stdout
    assert f"last result: {json.dumps(state['json'])} at {state['at']}" in text.stdout
    assert "later: camera yard, every 5 s, publish change (disabled)" in text.stdout

    ran = cli("run", "door")
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout) == state["json"]  # same frames, greedy: the same answer
    assert not [t for _, t, _ in collect(watcher, 1.0) if "/watch/" in t]  # `watch run` published no rule state
    unknown = cli("run", "nope")
    assert unknown.returncode == 78 and "no rule 'nope' (configured: door, later)" in unknown.stderr
