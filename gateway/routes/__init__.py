"""One controller per OpenAI resource, plus health."""
