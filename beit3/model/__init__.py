from beit3.model.beit3 import BEiT3, EncoderOutput
from beit3.model.multiway import Multiway, Streams, join, split

__all__ = ["BEiT3", "EncoderOutput", "Multiway", "Streams", "join", "split"]
