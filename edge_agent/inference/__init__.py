"""Inference, as the daemon sees it: the boundary types (`types`), the client of the local
inference process (`process`) and of an OpenAI-compatible server (`openai_client`). Only
`child/`, run in the inference process, imports onnxruntime_genai; nothing outside `child/`
imports it (the CLI's `models` commands excepted)."""

from edge_agent.inference.channel import Handle
from edge_agent.inference.process import LocalInference
from edge_agent.inference.types import Generation, GenerationParams, Guidance, Work

__all__ = ["Generation", "GenerationParams", "Guidance", "Handle", "LocalInference", "Work"]
