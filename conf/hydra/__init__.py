"""Hydra's own config groups, extended (launcher/)."""
