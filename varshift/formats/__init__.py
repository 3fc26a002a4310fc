"""Checkpoint and statistics file formats: one reader and writer per format."""
