"""Weights in and out: checkpoint sources, timm <-> Flax conversion, model directories, caches."""
