"""Reading and writing BEiT-3 weights: safe file loading, the official unilm/beit3 format."""
from beit3.core.weight_files import UnsafeCheckpointError, load_checkpoint_file, load_state_dict, load_zero_checkpoint
from beit3.weights.official import LoadedBackbone, LoadedModel, convert_official_to_ours, convert_ours_to_official, from_official, infer_config_from_official, infer_config_from_ours, load_backbone, load_official, save_official, split_official_state_dict, to_official

__all__ = [
    "LoadedBackbone", "LoadedModel", "UnsafeCheckpointError", "convert_official_to_ours",
    "convert_ours_to_official", "from_official", "infer_config_from_official", "infer_config_from_ours",
    "load_backbone", "load_checkpoint_file", "load_official", "load_state_dict", "load_zero_checkpoint",
    "save_official", "split_official_state_dict", "to_official",
]
