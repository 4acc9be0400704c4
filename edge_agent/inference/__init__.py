"""The only package that imports onnxruntime_genai."""

from edge_agent.inference.engine import Generation, GenerationParams, OrtGenaiEngine

__all__ = ["Generation", "GenerationParams", "OrtGenaiEngine"]
