"""The pretraining job: its settings and recipes, the masked-data-modeling objective, and the run."""
