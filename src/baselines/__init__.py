"""Competing samplers, one file each; importing the package registers them all."""
