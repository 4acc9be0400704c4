"""The only package that imports onnxruntime_genai, and only in the inference child: the daemon
imports `remote` and `types`, which never load the runtime (nor numpy)."""

from edge_agent.inference.process import EngineProcess, Handle
from edge_agent.inference.types import Generation, GenerationParams, Guidance, Work

__all__ = ["EngineProcess", "Generation", "GenerationParams", "Guidance", "Handle", "Work"]
