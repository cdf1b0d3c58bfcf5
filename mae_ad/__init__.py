"""mae_ad: the method. A LoRA masked autoencoder (timm blocks) that learns normal images and scores anomalies.

Importing this package does no work and loads no torch; submodules import what they need.
"""

__version__ = "0.1.0"
