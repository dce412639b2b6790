"""advseg: how easily adversarial noise breaks medical image segmentation models."""

__version__ = "0.1.0"
