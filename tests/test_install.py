"""scripts/install.sh into a temporary root (DESTDIR): idempotent, never overwrites settings,
rewrites the unit to its prefix, and --uninstall keeps what an operator made."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path


from support import REPO

SCRIPT = REPO / "scripts" / "install.sh"
PREFIX = "/opt/ea-test"


def install(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["bash", str(SCRIPT), *args], env={**os.environ, "DESTDIR": str(root), **env},
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every path under root: mode, mtime and content (or link target)."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            content = os.readlink(path)
        elif path.is_file():
            content = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            content = "dir"
        out[str(path.relative_to(root))] = (st.st_mode, st.st_mtime_ns, content)
    return out


def test_install_twice_changes_nothing_and_keeps_an_edited_config(tmp_path: Path) -> None:
    root = tmp_path / "root"
    first = install(root, "--prefix", PREFIX, "--venv-from", sys.prefix)
    assert "not creating" in first.stderr and "not running: systemctl enable" in first.stderr
    etc = root / "etc/edge-agent"
    assert (etc / "agent.toml").read_text() == (REPO / "config/agent.example.toml").read_text()
    assert (etc / "conf.d").is_dir()
    assert (etc / "credentials").stat().st_mode & 0o777 == 0o700
    assert (root / "var/lib/edge-agent/models").is_dir()
    assert (root / PREFIX.lstrip("/") / "venv").resolve() == Path(sys.prefix).resolve()

    (etc / "agent.toml").write_text('device_id = "site-7"\n')
    before = snapshot(root)
    second = install(root, "--prefix", PREFIX, "--venv-from", sys.prefix)
    assert snapshot(root) == before
    assert "wrote" not in second.stderr and "created" not in second.stderr
    assert (etc / "agent.toml").read_text() == 'device_id = "site-7"\n'


def test_the_installed_unit_runs_the_prefix(tmp_path: Path) -> None:
    root = tmp_path / "root"
    install(root, "--prefix", PREFIX, "--no-venv")
    unit = (root / "etc/systemd/system/edge-agent.service").read_text().splitlines()
    source = (REPO / "systemd/edge-agent.service").read_text().splitlines()
    assert f"ExecStart={PREFIX}/venv/bin/edge-agent run --config /etc/edge-agent/agent.toml" in unit
    assert [a for a, b in zip(unit, source) if a != b] == [line for line in unit if line.startswith("ExecStart=")]
    assert not (root / PREFIX.lstrip("/")).exists()  # --no-venv: nothing of ours there


def test_uninstall_removes_service_and_venv_keeps_settings_and_models(tmp_path: Path) -> None:
    root = tmp_path / "root"
    install(root, "--prefix", PREFIX, "--venv-from", sys.prefix)
    (root / "etc/edge-agent/credentials/mqtt-password").write_text("secret\n")
    override = root / "etc/systemd/system/edge-agent.service.d/override.conf"
    override.parent.mkdir()
    override.write_text("[Service]\nEnvironment=X=1\n")
    done = install(root, "--uninstall", "--prefix", PREFIX)
    assert not (root / "etc/systemd/system/edge-agent.service").exists()
    assert not (root / PREFIX.lstrip("/")).exists()
    assert Path(sys.prefix, "bin").is_dir()  # the linked venv itself is untouched
    assert (root / "etc/edge-agent/agent.toml").is_file()
    assert (root / "etc/edge-agent/credentials/mqtt-password").read_text() == "secret\n"
    assert (root / "var/lib/edge-agent/models").is_dir()
    assert override.is_file()  # the operator's drop-in is theirs
    assert "kept:" in done.stderr
    install(root, "--uninstall", "--prefix", PREFIX)  # twice is fine


def test_jetson_gets_a_drop_in_with_its_device_nodes(tmp_path: Path) -> None:
    host = tmp_path / "host"
    (host / "etc").mkdir(parents=True)
    (host / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 4.0\n")
    for node in ("dev/nvmap", "dev/nvhost-ctrl-gpu", "dev/nvgpu/igpu0/ctrl"):
        (host / node).parent.mkdir(parents=True, exist_ok=True)
        (host / node).write_text("")
    root = tmp_path / "root"
    install(root, "--no-venv", EDGE_AGENT_HOST_ROOT=str(host))
    drop_in = (root / "etc/systemd/system/edge-agent.service.d/jetson.conf").read_text().splitlines()
    assert [line for line in drop_in if not line.startswith("#")] == [
        "[Service]", "DeviceAllow=/dev/nvmap rw", "DeviceAllow=/dev/nvhost-ctrl-gpu rw",
        "DeviceAllow=/dev/nvgpu/igpu0/ctrl rw", "BindPaths=-/tmp/argus_socket"]
    install(root, "--uninstall", "--no-venv")
    assert not (root / "etc/systemd/system/edge-agent.service.d").exists()


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    for args in (["--prefix", "relative"], ["--prefix", "/usr"], ["--bogus"]):
        done = subprocess.run(["bash", str(SCRIPT), *args], env={**os.environ, "DESTDIR": str(tmp_path)},
                              capture_output=True, text=True, check=False)
        assert done.returncode == 1 and "install: error:" in done.stderr
    assert not any(tmp_path.iterdir())


def test_real_venv_install_then_up_to_date(tmp_path: Path) -> None:
    root = tmp_path / "root"
    base_python = str(Path(sys.base_prefix) / "bin" / "python3")
    # --no-deps: the runtime packages come from the system site; the build backend (setuptools)
    # comes from the package index in pip's isolated build, as on a real install.
    env = {"PYTHON": base_python, "EDGE_AGENT_PIP_ARGS": "--no-deps"}
    install(root, "--prefix", PREFIX, "--system-site-packages", **env)
    program = root / PREFIX.lstrip("/") / "venv/bin/edge-agent"
    version = subprocess.run([str(program), "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("edge-agent ")
    again = install(root, "--prefix", PREFIX, "--system-site-packages", **env)
    assert "is up to date" in again.stderr
    install(root, "--uninstall", "--prefix", PREFIX)
    assert not (root / PREFIX.lstrip("/")).exists()
    shutil.rmtree(root)
