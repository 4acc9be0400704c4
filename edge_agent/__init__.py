"""edge-agent: answers prompts over MQTT with a local model through ONNX Runtime GenAI."""

__version__ = "0.1.0"
