"""Layer 1: text tokenizer, masking, image transforms, pretraining sources, shards and loader, the
downstream benchmarks' formats, and the synthetic world's generator. Imports only ``beit3.core``."""
