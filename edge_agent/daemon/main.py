"""The daemon's main thread: signals, the health loop and reloads. Signal handlers and the
config watcher only set flags; this loop notices and acts."""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType

from edge_agent.daemon.app import Agent
from edge_agent.cameras.camera_set import validate_cameras
from edge_agent.settings.catalog import resolve_model_path
from edge_agent.errors import EXIT_CONFIG, BrokerError, ConfigError, ModelLoadError
from edge_agent.health.systemd import SystemdNotifier, SystemdService
from edge_agent.log import get_logger
from edge_agent.daemon.reload import ConfigWatcher
from edge_agent.settings.files import ConfigSources, load_settings
from edge_agent.settings.model import Settings

log = get_logger("daemon")
EXIT_OK, EXIT_FAILURE = 0, 1
HEALTH_CHECK_S = 1.0


def check_model_folder(settings: Settings) -> None:
    if settings.model.backend == "openai":
        return  # no local model
    folder = resolve_model_path(settings)  # a catalog name becomes its pulled folder
    if not (folder / "genai_config.json").is_file():
        raise ConfigError([f"model.path: {folder} is not a model folder "
                           "(no genai_config.json)"])


class Flags:
    """What the signal handlers and the watcher ask of the main loop."""

    def __init__(self) -> None:
        self.wake = threading.Event()
        self.stop = False
        self.reload = False

    def request_stop(self) -> None:
        self.stop = True
        self.wake.set()

    def request_reload(self) -> None:
        self.reload = True
        self.wake.set()


def install_signals(flags: Flags) -> None:
    def on_stop(signum: int, frame: FrameType | None) -> None:
        flags.request_stop()
        if signum == signal.SIGINT:  # a second Ctrl-C forces exit
            signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, lambda signum, frame: flags.request_reload())


def reload(agent: Agent, sources: ConfigSources) -> None:
    """Build and validate the new snapshot as a whole; apply it or keep the running one."""
    started = time.monotonic()
    try:
        new, _ = load_settings(sources.main)
        check_model_folder(new)
        validate_cameras(new)
        parts = agent.apply(new)
    except ConfigError as exc:
        log.error("config.rejected", problems=exc.problems)
        agent.report_config_error(exc.problems)
        return
    except (BrokerError, ModelLoadError) as exc:
        log.error("config.rejected", problems=[str(exc)])
        agent.report_config_error([str(exc)])
        return
    agent.report_config_error(None)
    log.info("config.applied", parts=sorted(parts), ms=round((time.monotonic() - started) * 1000, 1))


def run(settings: Settings, sources: ConfigSources) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    check_model_folder(settings)
    validate_cameras(settings)
    flags = Flags()
    install_signals(flags)
    try:
        agent = Agent(settings)
    except (BrokerError, ModelLoadError) as exc:
        log.error("agent.config_error", error=str(exc))
        return EXIT_CONFIG
    service = SystemdService(SystemdNotifier(), agent.making_progress)
    watcher = None
    if sources.main is not None:
        watcher = ConfigWatcher(sources.main, settings.reload_debounce_s, flags.request_reload)
    code = EXIT_OK
    try:
        agent.start()
        if watcher is not None:
            watcher.start()
        while not flags.stop:
            service.tick(agent.serving(), f"ready: {agent.engine.name} on {agent.engine.provider}")
            flags.wake.wait(service.tick_s(HEALTH_CHECK_S))
            flags.wake.clear()
            if flags.reload and not flags.stop:
                flags.reload = False
                with service.reloading():
                    reload(agent, sources)
                if watcher is not None:
                    watcher.debounce_s = agent.settings.reload_debounce_s
            agent.refresh_status()
            agent.publish_stats()
            if not agent.healthy():
                log.error("agent.unhealthy", mqtt_loop=agent.link.loop_alive())
                code = EXIT_FAILURE
                break
    except ModelLoadError as exc:
        log.error("model.load_failed", error=str(exc))
        agent.report_degraded(str(exc))
        code = EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 - say so on the status topic before exiting
        log.exception("agent.start_failed")
        agent.report_degraded(f"{type(exc).__name__}: {exc}")
        code = EXIT_FAILURE
    if watcher is not None:
        watcher.stop()
    service.stopping()
    agent.stop()
    return code
