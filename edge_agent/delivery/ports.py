"""What delivery needs of the outside: the broker link (publish an answer, acknowledge a
request) and the request as delivered. `mqtt.BrokerLink` and `mqtt.Incoming` fit these
structurally; delivery never imports them."""

from __future__ import annotations

from typing import Callable, Protocol, TypeVar


class Delivered(Protocol):
    """A request as the broker delivered it: what delivery reads before acknowledging it."""

    @property
    def mid(self) -> int: ...  # packet id: what the acknowledgement names

    @property
    def dup(self) -> bool: ...  # the broker handed it over before (it never saw our PUBACK)


M = TypeVar("M", bound=Delivered)
M_contra = TypeVar("M_contra", bound=Delivered, contravariant=True)


class Link(Protocol[M_contra]):
    """The current broker link. A reload may replace it: delivery asks a getter for it each
    time, and tells links apart by identity ("on its way on the current link")."""

    def publish(self, topic: str, payload: bytes, *, correlation_data: bytes | None = None,
                qos: int = 1, on_acked: Callable[[], None] | None = None) -> object:
        """Queue an answer (never waits); `on_acked` runs, on the link's network thread, when the
        broker confirms it (PUBACK, or PUBCOMP for QoS 2)."""

    def ack(self, message: M_contra) -> None:
        """Acknowledge a delivered request (PUBACK): the broker will not deliver it again."""
