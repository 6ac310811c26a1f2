"""beit3: pretraining and fine-tuning of BEiT-3 Multiway Transformers."""
from .config import PRESETS, BEiT3Config
from .model import BEiT3

__version__ = "0.1.0"
__all__ = ["BEiT3", "BEiT3Config", "PRESETS", "__version__"]
