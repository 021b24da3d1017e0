"""MAPS: Memory Augmented Panoptic Segmentation, as an experiment suite."""

__version__ = "0.1.0"
