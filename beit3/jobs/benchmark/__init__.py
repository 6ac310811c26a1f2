"""Pieces of ``beit3 benchmark``: synthetic batches, step timing and memory, the reference models
(torchscale, timm), the micro-batch search, the profiler summary and the report."""
