"""The fine-tuning job and its evaluation: the tasks, their recipes and run options, the run."""
