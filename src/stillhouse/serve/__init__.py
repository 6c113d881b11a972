"""``stillhouse serve``: an OpenAI-compatible server over a local teacher (continuous batching, SSE)."""
