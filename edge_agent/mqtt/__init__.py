"""The only package that imports paho: the daemon's broker link and the `ask` client."""

from edge_agent.mqtt.ask import ask_once, read_retained
from edge_agent.mqtt.client import Incoming
from edge_agent.mqtt.link import BrokerLink

__all__ = ["BrokerLink", "Incoming", "ask_once", "read_retained"]
