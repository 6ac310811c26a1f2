"""beit3: pretraining and fine-tuning of BEiT-3 Multiway Transformers."""
from beit3.weights.official import from_official, to_official
from beit3.model.config import PRESETS, BEiT3Config
from beit3.model import BEiT3

__version__ = "0.1.0"
__all__ = ["BEiT3", "BEiT3Config", "PRESETS", "from_official", "to_official", "backbones", "create_model",
           "list_models", "download", "from_pretrained", "load_predictor", "embed_images", "embed_texts", "__version__"]


def __getattr__(name):
    # Lazy: backbones imports timm, which `import beit3` should not pay for.
    if name == "backbones":
        import importlib
        return importlib.import_module(".backbones", __name__)
    if name in ("create_model", "list_models", "download"):
        from beit3.weights import hub
        return getattr(hub, name)
    if name == "from_pretrained":
        from beit3.model.pretrained import from_pretrained
        return from_pretrained
    if name == "load_predictor":
        from beit3.inference.predictor import load_predictor
        return load_predictor
    if name in ("embed_images", "embed_texts"):
        from beit3.inference import embed
        return getattr(embed, name)
    raise AttributeError(f"module 'beit3' has no attribute {name!r}")
