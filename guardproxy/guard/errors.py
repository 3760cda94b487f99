"""The guard engine's errors: what the scheduler, the engine, the shared engine's link and the guard
process raise, and what ``server/`` maps to HTTP (429, 503, 400, 500) without importing the scheduler."""

from __future__ import annotations


class EngineError(RuntimeError):
    """Base of the guard engine's errors."""


class EngineOverloaded(EngineError):
    """No room for another stream now; the proxy answers 429 with ``Retry-After``."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineUnavailable(EngineOverloaded):
    """The shared guard engine cannot be reached now (starting, or restarting after a crash); the proxy
    answers 503 with ``Retry-After``."""


class PromptTooLong(EngineError):
    """A prompt that can never fit (render it with ``max_tokens=engine.max_prompt_tokens``)."""


class StreamClosed(EngineError):
    pass


class GuardFailure(EngineError):
    """The model failed while judging this stream's tokens; the stream is dead, the engine is not."""
