"""Samplers that live in the core library (AsyncLane); importing registers them."""
