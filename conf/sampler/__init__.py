"""Sampler presets; file stem == registry key == the sampler column of results."""
