"""Fleet configuration by files: main file, conf.d drop-ins in name order, then environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.errors import ConfigError
from edge_agent.settings.files import explain_settings, load_settings


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "agent.toml").write_text(
        'device_id = "box"\n[mqtt]\nhost = "broker"\nport = 1883\n[limits]\nqueue_size = 4\n')
    return tmp_path


def test_dropins_merge_deeply_in_name_order(etc: Path) -> None:
    (etc / "conf.d" / "50-site.toml").write_text('[mqtt]\nport = 2000\n[cameras.front]\nsource = "0"\n')
    (etc / "conf.d" / "90-local.toml").write_text('[mqtt]\nport = 3000\n')
    settings, sources = load_settings(etc / "agent.toml")
    assert settings.mqtt.port == 3000 and settings.mqtt.host == "broker"  # merged, not replaced
    assert settings.limits.queue_size == 4 and settings.cameras["front"].source == "0"
    assert [p.name for p in sources.files] == ["agent.toml", "50-site.toml", "90-local.toml"]


def test_dot_files_and_other_names_are_ignored(etc: Path) -> None:
    (etc / "conf.d" / ".50-site.toml.swp").write_text("garbage")
    (etc / "conf.d" / ".hidden.toml").write_text('[mqtt]\nport = 9\n')
    (etc / "conf.d" / "README").write_text("not toml")
    (etc / "conf.d" / "60.toml.bak").write_text("[[[")
    settings, _ = load_settings(etc / "agent.toml")
    assert settings.mqtt.port == 1883


def test_environment_wins_over_every_file(etc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (etc / "conf.d" / "50-site.toml").write_text('[mqtt]\nport = 2000\n')
    monkeypatch.setenv("EDGE_AGENT_MQTT__PORT", "4000")
    settings, sources = load_settings(etc / "agent.toml")
    assert settings.mqtt.port == 4000
    assert sources.origin("mqtt.port") == "environment EDGE_AGENT_MQTT__PORT"


def test_explain_names_the_file_that_set_each_value(etc: Path) -> None:
    (etc / "conf.d" / "50-site.toml").write_text('[mqtt]\nport = 2000\n')
    settings, sources = load_settings(etc / "agent.toml")
    rows = {key: (value, origin) for key, value, origin in explain_settings(settings, sources)}
    assert rows["mqtt.port"] == (2000, str(etc / "conf.d" / "50-site.toml"))
    assert rows["mqtt.host"] == ("broker", str(etc / "agent.toml"))
    assert rows["mqtt.keepalive"] == (30, "default")


def test_errors_name_the_dropin_that_caused_them(etc: Path) -> None:
    (etc / "conf.d" / "50-site.toml").write_text('[limits]\nqueue_size = 0\ncolour = 1\n')
    (etc / "conf.d" / "60-broken.toml").write_text('[mqtt\n')
    with pytest.raises(ConfigError) as info:
        load_settings(etc / "agent.toml")
    assert info.value.problems == [f"{etc / 'conf.d' / '60-broken.toml'}: invalid TOML: "
                                   + info.value.problems[0].split("invalid TOML: ", 1)[1]]
    (etc / "conf.d" / "60-broken.toml").unlink()
    with pytest.raises(ConfigError) as info:
        load_settings(etc / "agent.toml")
    assert sorted(info.value.problems) == sorted([
        f"{etc / 'conf.d' / '50-site.toml'}: limits.colour: unknown key",
        f"{etc / 'conf.d' / '50-site.toml'}: limits.queue_size: Input should be greater than or equal to 1 (got 0)"])


def test_relative_paths_are_relative_to_their_own_file(etc: Path) -> None:
    (etc / "conf.d" / "50-model.toml").write_text('[model]\npath = "../models/phi"\n')
    settings, _ = load_settings(etc / "agent.toml")
    assert settings.model.path == etc / "conf.d" / ".." / "models" / "phi"
