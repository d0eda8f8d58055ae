"""What every tool shares: the device-mesh runner, caches, huge pages, orbax I/O."""
