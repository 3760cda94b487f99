"""guardproxy: a streaming guardrail proxy for OpenAI-compatible LLM servers (Qwen3Guard-Stream)."""

__version__ = "0.1.0"
