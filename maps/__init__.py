"""MAPS: Memory Augmented Panoptic Segmentation, as an experiment suite."""
import warnings

__version__ = "0.1.0"

# fvcore (imported by detectron2) scripts a function at import; torch >= 2.10 deprecates that
# with a FutureWarning in every process (jobs' logs included) that nothing here can act on
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
