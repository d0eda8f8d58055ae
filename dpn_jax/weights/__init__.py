"""Weights in and out: checkpoint sources, timm <-> Flax conversion, model directories, the hub cache."""
