"""Layer 1: the benchmarks' official metrics (VQA accuracy, retrieval recall, caption scores,
classification accuracy, segmentation mIoU) and how results are printed and saved."""
