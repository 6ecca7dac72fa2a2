"""The engine: paged KV cache, prefix and image reuse, continuous batching, capture-ready decode (issue 9)."""
