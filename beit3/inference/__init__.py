"""Layer 2, the top of the library: predictions from a saved model (``Predictor``), batched
embeddings, saved embedding matrices and their search."""
