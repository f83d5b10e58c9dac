"""cxrjax: ViT fine-tuning for chest radiographs in JAX/Flax."""

__version__ = "0.1.0"
