"""asynclane: native LLaDA/Dream backbones with explicit KV caches, the sampler seam, and AsyncLane."""
from .backbone import Backbone, BackboneSpec, KVCache, ModelConfig, Transformer
from .counting import CountingBackbone
from .loading import TINY_DIR, CheckpointError, CheckpointNotFound, load_backbone
from . import samplers  # noqa: F401  (registers the core library's samplers)
from .sampler import REGISTRY, Generation, SamplerConfig, build_sampler, register

__all__ = ["Backbone", "BackboneSpec", "KVCache", "ModelConfig", "Transformer", "CountingBackbone",
           "TINY_DIR", "CheckpointError", "CheckpointNotFound", "load_backbone", "REGISTRY", "Generation", "SamplerConfig",
           "build_sampler", "register"]
