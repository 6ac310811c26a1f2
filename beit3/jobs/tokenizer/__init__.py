"""Training a VQ-KD visual tokenizer (``beit3 train-tokenizer``)."""
