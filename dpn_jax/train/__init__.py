"""Data-parallel training: the trainer loop, its state and checkpoints, optimiser and records."""
