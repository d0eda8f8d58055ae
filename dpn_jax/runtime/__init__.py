"""Process-level setup shared by every tool: the device mesh runner, compilation cache, huge pages."""
