"""Layer 2: the BEiT v2 visual tokenizer (VQ-KD): its model, codebook and teachers. Training it is a
job (``beit3.jobs.tokenizer``)."""
