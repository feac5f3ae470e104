"""res2det: Res2Net backbones and detectors in pure PyTorch."""
from .detections import Detections
from .errors import CheckpointError, Res2DetError
from .zoo import create_model, list_models

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "Detections", "Res2DetError", "CheckpointError", "__version__"]
