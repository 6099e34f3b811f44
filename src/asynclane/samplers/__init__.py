"""Samplers that live in the core library (AsyncLane); importing registers them."""
from . import asynclane  # noqa: F401  (importing registers the sampler)
