"""Layer 4, the jobs: pretraining, fine-tuning and evaluation, tokenizer training, batch embedding,
the benchmark and GPU check, and the demo's cached assets. Each runs in ``beit3.trainer``."""
