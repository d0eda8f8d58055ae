"""Datasets and input pipelines: sources, transforms and batching (knows no model)."""
