"""Competing samplers, one file each; importing the package registers them all."""
from . import blockwise  # noqa: F401  (importing registers the sampler)
