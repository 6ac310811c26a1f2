"""Weight initialisation with unilm's cut normal, shared by the backbone, the pretraining heads and
the task heads.

unilm's ``trunc_normal_`` (beit and beit2 ``modeling_pretrain.py``, beit3 ``modeling_utils.py``)
calls timm's with ``a=-std, b=std``: a normal of std 0.02 cut at one standard deviation, whose
actual standard deviation is 0.02 x 0.54 = 0.0108. Cutting at timm's default +-2 (absolute) would
leave a plain normal of std 0.02. Which weights each reference draws this way: docs/model.md.
"""
from __future__ import annotations

import math

from timm.layers import trunc_normal_ as _timm_trunc_normal_
from torch import Tensor

# Standard deviation of a unit normal truncated to [-1, 1]: sqrt(1 - 2 phi(1) / (2 Phi(1) - 1)).
TRUNCATED_STD_RATIO = math.sqrt(1 - 2 * math.exp(-0.5) / math.sqrt(2 * math.pi) / math.erf(1 / math.sqrt(2)))


def trunc_normal_(tensor: Tensor, std: float) -> Tensor:
    """In place: a normal of std ``std`` truncated at +-``std``, through timm's function as unilm calls
    it (inverse CDF, one pass; torch's own redraws the whole tensor until every value is inside,
    about 15 passes at this cut)."""
    return _timm_trunc_normal_(tensor, mean=0.0, std=std, a=-std, b=std)


def subln_scale(depth: int) -> float:
    """torchscale's Sub-LN (Magneto) gain for an encoder of ``depth`` layers: sqrt(log 2N)."""
    return math.sqrt(math.log(2 * depth))
