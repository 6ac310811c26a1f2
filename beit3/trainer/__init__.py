"""Layer 3, the job framework: the Trainer every job runs in, run folders, checkpoints, distributed
setup, DeepSpeed configs and engines, the optimizer and schedule, metrics logging, FLOPs and MFU."""
