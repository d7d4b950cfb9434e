"""nextdetail: data pipelines for next-detail (CART) autoregressive image generation."""

# Which version wrote which on-disk format: README.md, "Versions and formats".
__version__ = "0.3.0"
