"""nextdetail: data pipelines for next-detail (CART) autoregressive image generation."""

__version__ = "0.2.0"
