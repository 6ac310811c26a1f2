"""Activation checkpointing of one Multiway block: "full" (keep the block's input, recompute it all)
or "selective" (also keep the matmul and attention outputs, recompute only the elementwise ops).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import (CheckpointPolicy, SelectiveCheckpointContext, checkpoint,
                                    create_selective_checkpoint_contexts)

from beit3.model.multiway import Streams

CHECKPOINT_MODES = ("full", "selective")
_aten = torch.ops.aten
# Selective checkpointing keeps what these ops return (the projections, fc1/fc2, and the attention
# output with its softmax statistics, whichever SDPA kernel runs; the math kernel's bmm) and
# recomputes the rest: LayerNorms, GELU, residual adds, casts. Those are memory-heavy (the Sub-LN
# and GELU activations are (B, L, ffn_dim) each) but cost no matmul FLOPs to redo.
SAVED_OPS = frozenset(getattr(_aten, name).default for name in (
    "mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention") if hasattr(_aten, name))
# Route the tensors selective checkpointing keeps through the caller's saved_tensors_hooks (e.g.
# activation offloading to the CPU), as every other saved tensor; torch's opt-in, where it has it.
_HOOKS_KW = ({"respect_saved_tensors_hooks": True}
             if "respect_saved_tensors_hooks" in inspect.signature(checkpoint).parameters else {})


class KeepMatmuls:
    """Selective-checkpointing policy for one block call: keep the ``SAVED_OPS`` outputs, recompute
    the rest.

    One exception: an in-place write to a kept output is kept too. DeepSpeed ZeRO-3 replaces
    ``F.linear`` (``memory_efficient_linear``, process-wide) with ``mm`` then ``output += bias``
    for (B, L, D) inputs. torch keeps the mm output by alias and misses the write (it goes through
    matmul's ``_unsafe_view``, which has its own version counter), so the recomputation would add the
    bias a second time: wrong gradients as soon as the biases are not zero. Keeping the write hands
    the recomputation the written value instead (torch's own check would reject that kept write, so
    it is off: this policy sees every write to a kept storage). A write after a recomputed op has
    read the kept value cannot be replayed that way and raises.

    torch >= 2.14 shows the policy each op's outputs; before that (``sees_outputs=False``) the
    policy is asked before the op runs, and ``SeeOutputs`` reports the outputs to ``ran`` after."""

    def __init__(self, sees_outputs: bool = True):
        self.sees_outputs = sees_outputs
        self.kept: set[int] = set()  # data pointers of kept storages
        self.read: set[int] = set()  # ... of those read by a recomputed op (not a mere alias)
        self.recomputing = False

    def __call__(self, ctx, op, *args, **kwargs) -> CheckpointPolicy:
        if getattr(ctx, "is_recompute", False) and not self.recomputing:  # torch < 2.14 asks again
            self.recomputing = True
            self.kept.clear(), self.read.clear()
        if op in SAVED_OPS:
            if self.sees_outputs:
                self.kept |= _storages(ctx.op_output)
            return CheckpointPolicy.MUST_SAVE
        written = _storages(_written_args(op, args, kwargs)) & self.kept
        if written & self.read:
            raise RuntimeError(f"selective activation checkpointing: {op} writes in place to a kept matmul "
                               f"output that a recomputed op has already read; use mode='full'")
        if written:
            return CheckpointPolicy.MUST_SAVE
        if self.sees_outputs:
            self.read |= (_storages((args, kwargs)) & self.kept) - _storages(ctx.op_output)
        return CheckpointPolicy.PREFER_RECOMPUTE

    def ran(self, op, args, kwargs, out) -> None:
        """What the policy would have read off ``ctx.op_output`` (``sees_outputs=False``)."""
        if op in SAVED_OPS:
            self.kept |= _storages(out)
        elif not _storages(_written_args(op, args, kwargs)) & self.kept:
            self.read |= (_storages((args, kwargs)) & self.kept) - _storages(out)


class SeeOutputs(TorchDispatchMode):
    """Entered above torch's selective-checkpoint mode: hands every op's outputs to the policy."""

    def __init__(self, policy: KeepMatmuls):
        super().__init__()
        self.policy = policy

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.policy.ran(func, args, kwargs, out)
        return out


# torch >= 2.14 passes the op's outputs to the policy (SelectiveCheckpointContext.op_output).
SEES_OUTPUTS = "op_output" in inspect.signature(SelectiveCheckpointContext.__init__).parameters


@contextlib.contextmanager
def _both(first, second):
    with first, second:
        yield


def selective_contexts():
    """The (forward, recompute) contexts of one selectively checkpointed call."""
    policy = KeepMatmuls(SEES_OUTPUTS)
    fwd, rec = create_selective_checkpoint_contexts(policy, allow_cache_entry_mutation=True)
    if SEES_OUTPUTS:
        return fwd, rec
    return _both(fwd, SeeOutputs(policy)), _both(rec, SeeOutputs(policy))


def _storages(tree) -> set[int]:
    """Data pointers of the tensors' storages (0, an empty storage, is none)."""
    return {p for t in tree_leaves(tree) if isinstance(t, Tensor) and (p := t.untyped_storage().data_ptr())}


def _written_args(op, args: tuple, kwargs: dict) -> list:
    """The arguments ``op`` writes to (``Tensor(a!)`` in its schema: in-place and out= ops)."""
    schema = getattr(op, "_schema", None)  # None: a higher-order op (a compiled region): no writes
    if schema is None or not schema.is_mutable:
        return []
    return [args[i] if i < len(args) else kwargs.get(a.name) for i, a in enumerate(schema.arguments)
            if a.alias_info is not None and a.alias_info.is_write]


def checkpoint_block(block: nn.Module, xs: Streams, mask: Optional[Tensor], fusion: bool,
                     mode: str = "full") -> Streams:
    """``block(xs, mask, fusion)`` recomputed in backward (non-reentrant torch checkpoint, which also
    re-runs ZeRO-3's parameter-gathering hooks). "full" keeps only the block's inputs; "selective"
    also keeps the ``SAVED_OPS`` outputs, so backward repeats no matmul."""
    if mode == "full":
        return checkpoint(block, xs, mask, fusion, use_reentrant=False)
    if mode == "selective":
        return checkpoint(block, xs, mask, fusion, use_reentrant=False, context_fn=selective_contexts, **_HOOKS_KW)
    raise ValueError(f"activation checkpointing mode {mode!r}: expected one of {CHECKPOINT_MODES}")
