"""Sans-IO streaming core: SSE, re-tokenization, moderation state. No asyncio, no sockets."""
