"""beit3: pretraining and fine-tuning of BEiT-3 Multiway Transformers."""
__version__ = "0.1.0"

from beit3.weights.official import from_official, to_official
from beit3.model.config import PRESETS, BEiT3Config
from beit3.model import BEiT3
from beit3.model.pretrained import from_pretrained
from beit3.weights import backbones
from beit3.weights.hub import create_model, download, list_models
from beit3.inference.embed import embed_images, embed_texts
from beit3.inference.predictor import load_predictor

__all__ = ["BEiT3", "BEiT3Config", "PRESETS", "from_official", "to_official", "backbones", "create_model",
           "list_models", "download", "from_pretrained", "load_predictor", "embed_images", "embed_texts", "__version__"]
