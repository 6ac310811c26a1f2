"""Dense features of the vision path: the patch tokens of chosen layers as feature maps, with the
arguments and meanings of timm's ``VisionTransformer.forward_intermediates``, so that code written
for timm backbones (segmentation and detection necks) takes BEiT-3 as it is.

    final, maps = model.forward_intermediates(image, indices=[3, 5, 7, 11])   # maps: 4 x (B, D, h, w)
    maps = model.forward_intermediates(image, indices=4, intermediates_only=True)  # the last 4 layers

``indices``: an int n takes the last n layers, a list takes those layers (negative from the end),
None takes every layer; maps come in layer order. ``norm`` passes each map through the final
LayerNorm (BEiT's dense heads read them without it). The CLS token is dropped from the maps
(``return_prefix_tokens`` returns it beside each map). The module imports nothing from timm:
``import beit3`` stays light.
"""
from __future__ import annotations

from typing import Sequence, Union

from torch import Tensor

Indices = Union[int, Sequence[int], None]
OUTPUT_FORMATS = ("NCHW", "NLC")


def take_indices(depth: int, indices: Indices) -> list[int]:
    """timm's ``feature_take_indices``: absolute layer indices, in the order given."""
    if indices is None:
        indices = depth
    if isinstance(indices, int):
        if not 0 < indices <= depth:
            raise ValueError(f"indices={indices}: the last n layers need 1 <= n <= {depth}")
        return list(range(depth - indices, depth))
    taken = [depth + i if i < 0 else i for i in indices]
    bad = [i for i, t in zip(indices, taken) if not 0 <= t < depth]
    if bad or not taken:
        raise ValueError(f"indices {list(indices)}: each must lie in [{-depth}, {depth}) and at least one is needed")
    return taken


def tokens_to_map(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, h * w, D) patch tokens -> (B, D, h, w)."""
    B, _, D = tokens.shape
    return tokens.transpose(1, 2).reshape(B, D, *grid).contiguous()


def vision_intermediates(model, image: Tensor, indices: Indices = None, return_prefix_tokens: bool = False,
                         norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                         intermediates_only: bool = False):
    """``BEiT3.forward_intermediates`` (see the module docstring). Returns ``(final, maps)`` with
    ``final`` the image tokens (B, 1 + N, D) after the final norm (after the last layer run when
    ``stop_early``), or only ``maps``."""
    if output_fmt not in OUTPUT_FORMATS:
        raise ValueError(f"output_fmt={output_fmt!r}: expected one of {OUTPUT_FORMATS}")
    take = sorted(set(take_indices(model.cfg.depth, indices)))  # layer order, as timm appends them
    out = model.forward_streams(image=image, out_layers=take, num_layers=take[-1] + 1 if stop_early else None)
    grid = (image.shape[-2] // model.cfg.patch_size, image.shape[-1] // model.cfg.patch_size)
    maps, prefix = [], []
    for i in take:
        x = out.hidden[i][0]  # (B, 1 + N, D) before the final norm
        if norm:
            x = model.norm((x, None))[0]
        prefix.append(x[:, :1])
        maps.append(tokens_to_map(x[:, 1:], grid) if output_fmt == "NCHW" else x[:, 1:])
    if return_prefix_tokens:
        maps = list(zip(maps, prefix))
    return maps if intermediates_only else (out.image, maps)


__all__ = ["OUTPUT_FORMATS", "take_indices", "tokens_to_map", "vision_intermediates"]
