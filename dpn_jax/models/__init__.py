"""The DPN model layer: Flax modules, layers and the timm-style registry (imports only `ops`)."""
