"""res2det: Res2Net backbones and detectors in pure PyTorch."""
from .structures import Detections
from .errors import CheckpointError, Res2DetError
from .version import __version__
from .zoo import create_model, list_models

__all__ = ["create_model", "list_models", "Detections", "Res2DetError", "CheckpointError", "__version__"]
