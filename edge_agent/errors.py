"""The project's error hierarchy: one root, `EdgeAgentError`, so a caller can catch the
project's failures in one clause (aiomqtt's `MqttError`). Each boundary module translates its
library's exceptions into these (`raise ... from exc`). Codes that go on the wire live here and
nowhere else."""

from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    """Stable error codes of protocol v1 (documented in docs/protocol.md)."""

    BAD_REQUEST = "bad_request"
    TOO_LARGE = "too_large"
    BUSY = "busy"
    TIMEOUT = "timeout"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"
    CAMERA_UNAVAILABLE = "camera_unavailable"
    STALE_FRAME = "stale_frame"
    BAD_IMAGE = "bad_image"
    UNSUPPORTED = "unsupported"
    FORBIDDEN = "forbidden"


class EdgeAgentError(Exception):
    """The root of every error this project raises on purpose."""


class AgentError(EdgeAgentError):
    """An error that becomes an error answer with a stable code."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class BadRequest(AgentError):
    code = ErrorCode.BAD_REQUEST


class TooLarge(AgentError):
    code = ErrorCode.TOO_LARGE


class Busy(AgentError):
    code = ErrorCode.BUSY


class Internal(AgentError):
    """The agent failed the request, not the asker: a bug, a crashed inference process."""

    code = ErrorCode.INTERNAL


class Timeout(AgentError):
    code = ErrorCode.TIMEOUT


class Unavailable(AgentError):
    code = ErrorCode.UNAVAILABLE


class CameraUnavailable(AgentError):
    code = ErrorCode.CAMERA_UNAVAILABLE


class StaleFrame(AgentError):
    code = ErrorCode.STALE_FRAME


class BadImage(AgentError):
    code = ErrorCode.BAD_IMAGE


class Unsupported(AgentError):
    code = ErrorCode.UNSUPPORTED


class Forbidden(AgentError):
    """Allowed by the protocol, refused by this agent's settings (free prompts)."""

    code = ErrorCode.FORBIDDEN


EXIT_CONFIG = 78  # sysexits EX_CONFIG: systemd's RestartPreventExitStatus= stops a restart loop on it


class ConfigError(EdgeAgentError):
    """Settings could not be loaded; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class ModelLoadError(EdgeAgentError):
    """The model folder or the execution provider could not be loaded."""


class BrokerError(EdgeAgentError):
    """The MQTT broker could not be reached or refused us."""


class CatalogError(EdgeAgentError):
    """The model catalog could not be read, or a model could not be pulled from it."""


class StoreError(EdgeAgentError):
    """The state database (outbox, de-duplication) failed: disk full, a damaged file."""
