"""Parameter counts by component, and model FLOPs per sample (for throughput and MFU)."""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

COMPONENTS = ("vision_ffn", "language_ffn", "vl_ffn", "attention", "embeddings", "final_norm", "heads")


def component_of(name: str) -> str:
    if name.startswith(("vision_embed.", "text_embed.")):
        return "embeddings"
    if ".ffn_vl." in name:
        return "vl_ffn"
    if ".ffn.A." in name:
        return "vision_ffn"
    if ".ffn.B." in name:
        return "language_ffn"
    if ".attn." in name:
        return "attention"
    if name.startswith("norm."):
        return "final_norm"
    return "heads"


def count_parameters(model: nn.Module, prefix: str = "") -> "OrderedDict[str, int]":
    """Parameters per component (see COMPONENTS) plus "total". Works on the meta device."""
    counts = OrderedDict((c, 0) for c in COMPONENTS)
    for name, p in model.named_parameters():
        if prefix:
            if not name.startswith(prefix):
                continue
            name = name[len(prefix):]
        counts[component_of(name)] += p.numel()
    counts["total"] = sum(counts[c] for c in COMPONENTS)
    return counts


def format_parameter_table(counts: dict) -> str:
    lines = [f"{'component':<14}{'parameters':>16}{'':>10}"]
    for k, v in counts.items():
        if k != "total" and v == 0:
            continue
        lines.append(f"{k:<14}{v:>16,}{v / 1e6:>9.2f}M")
    return "\n".join(lines)
