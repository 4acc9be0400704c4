"""The only package that imports onnxruntime_genai (the daemon runs it in a child process:
remote.py and worker.py)."""

from edge_agent.inference.engine import Generation, GenerationParams, OrtGenaiEngine
from edge_agent.inference.remote import EngineProcess

__all__ = ["EngineProcess", "Generation", "GenerationParams", "OrtGenaiEngine"]
