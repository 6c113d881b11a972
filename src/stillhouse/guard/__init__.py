"""Guard: an OpenAI-compatible gateway that authenticates, logs, limits and enforces."""
