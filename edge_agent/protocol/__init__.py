"""Protocol v1, the public API over MQTT: topic names (topics.py), request parsing and validation
(requests.py), what the agent publishes (payloads.py).

Pure: no I/O, no MQTT, no model. docs/protocol.md documents every field here; keep both in step.
"""

from edge_agent.protocol.payloads import answer_payload, chunk_payload, encode, error_payload
from edge_agent.protocol.requests import (MAX_FRAMES, MAX_ID_CHARS, PROTOCOL_VERSION, REQUEST_FIELDS,
                                          Request, RequestError, RequestLimits, parse_cancel, parse_request)
from edge_agent.protocol.topics import MAX_TOPIC_CHARS, Topics, check_topic_name, choose_reply_topic, topic_matches

__all__ = ["MAX_FRAMES", "MAX_ID_CHARS", "MAX_TOPIC_CHARS", "PROTOCOL_VERSION", "REQUEST_FIELDS", "Request",
           "RequestError", "RequestLimits", "Topics", "answer_payload", "check_topic_name", "choose_reply_topic",
           "chunk_payload", "encode", "error_payload", "parse_cancel", "parse_request", "topic_matches"]
