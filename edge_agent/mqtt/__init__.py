"""The broker link: the daemon's connection (connect, will, subscriptions, publishing
acknowledged, reconnect with back-off), the one-shot `ask` client, and received messages
as paho-free `Incoming` values. The only package that imports paho.
It imports only errors, log, backoff and settings of this package; never work/, delivery/,
daemon/ or inference/: they hand it bytes and callbacks."""

from edge_agent.mqtt.ask import ask_once, read_retained
from edge_agent.mqtt.client import Incoming
from edge_agent.mqtt.link import BrokerLink

__all__ = ["BrokerLink", "Incoming", "ask_once", "read_retained"]
