"""Downstream benchmark data: build the unilm/beit3 index files (``build``) and read them
(``datasets``). This module holds ``build_all_indexes``; the command line is ``beit3 data downstream``:

    beit3 data downstream {vqa,retrieval,captioning,nlvr2,imagenet,all} --raw ... --data-root ... --spm ...

Index files go to ``--output`` (default: the data root, where the readers look for them).
"""
from __future__ import annotations

import os
from pathlib import Path

from beit3.data.downstream.build import build_answer_vocab, build_captioning_index, build_imagenet_index, build_nlvr2_index, build_nocaps_index, build_retrieval_index, build_vqa_index, find_vqa_files, read_jsonl, scan_image_ids, split_rest_val, text_segment, vqa_soft_score, write_jsonl
from beit3.data.downstream.datasets import INDEX_FILES, CaptioningDataset, CIFARDataset, ClassificationDataset, ImageLoadError, NLVR2Dataset, RetrievalDataset, VQADataset, index_files, load_answer2label, load_image, text_segment_to_input
from beit3.data.text_tokenizer import TextTokenizer

NOCAPS_FILES = {"val": "nocaps_val_4500_captions.json", "test": "nocaps_test_image_info.json"}


def build_all_indexes(raw_dir: str | os.PathLike, data_root: str | os.PathLike, spm_path: str | os.PathLike,
                      seed: int = 0, min_answer_count: int = 9, rest_val_images: int = 1000,
                      output_dir: str | os.PathLike | None = None) -> dict[str, int]:
    """Build every index whose raw files are present; returns ``{index file: items}``.

    Looks for ``raw_dir/vqa/`` (or ``raw_dir``) VQA question/annotation files,
    ``raw_dir/dataset_coco.json`` (COCO retrieval + captioning), ``raw_dir/dataset_flickr30k.json``,
    the nocaps JSONs, ``raw_dir/nlvr2/`` and an ImageFolder tree ``classification/{train,val}`` in
    ``data_root`` or ``raw_dir`` (-> the imagenet index). Image locations follow each builder's rules.
    """
    raw, out = Path(raw_dir), Path(output_dir or data_root)
    tok = TextTokenizer(spm_path)
    counts: dict[str, int] = {}
    vqa_dir = raw / "vqa" if (raw / "vqa").is_dir() else raw
    if "train" in find_vqa_files(vqa_dir):
        counts |= build_vqa_index(vqa_dir, data_root, tok, out, min_answer_count=min_answer_count,
                                  rest_val_images=rest_val_images, seed=seed)
    if (raw / "dataset_coco.json").is_file():
        counts |= build_retrieval_index(raw / "dataset_coco.json", tok, out, "coco_retrieval")
        counts |= build_captioning_index(raw / "dataset_coco.json", tok, out)
    if (raw / "dataset_flickr30k.json").is_file():
        counts |= build_retrieval_index(raw / "dataset_flickr30k.json", tok, out, "flickr30k")
    for split, name in NOCAPS_FILES.items():
        if (raw / name).is_file():
            counts |= build_nocaps_index(raw / name, split, out)
    if (raw / "nlvr2").is_dir():
        counts |= build_nlvr2_index(raw / "nlvr2", data_root, tok, out)
    cls_root = next((d for d in (Path(data_root) / "classification", raw / "classification")
                     if (d / "train").is_dir() and (d / "val").is_dir()), None)
    if cls_root is not None:
        counts |= build_imagenet_index(cls_root / "train", cls_root / "val", data_root, out)
    if not counts:
        raise FileNotFoundError(f"{raw_dir}: found no raw annotation files to build indexes from")
    return counts


__all__ = [
    "build_all_indexes", "build_vqa_index", "build_retrieval_index", "build_captioning_index",
    "build_nocaps_index", "build_nlvr2_index", "build_imagenet_index", "build_answer_vocab",
    "vqa_soft_score", "split_rest_val", "find_vqa_files", "scan_image_ids", "text_segment",
    "read_jsonl", "write_jsonl", "INDEX_FILES", "index_files", "VQADataset", "RetrievalDataset",
    "CaptioningDataset", "NLVR2Dataset", "ClassificationDataset", "CIFARDataset", "ImageLoadError",
    "load_image", "load_answer2label", "text_segment_to_input",
]
