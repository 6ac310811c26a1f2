"""Downstream benchmark data: build the unilm/beit3 index files (``build``) and read them
(``datasets``). This module holds ``build_all_indexes`` and the command line:

    python -m beit3.data.downstream {vqa,retrieval,captioning,nlvr2,imagenet,all} --raw ... --data-root ... --spm ...

Index files go to ``--output`` (default: the data root, where the readers look for them).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from beit3.data.downstream.build import build_answer_vocab, build_captioning_index, build_imagenet_index, build_nlvr2_index, build_nocaps_index, build_retrieval_index, build_vqa_index, find_vqa_files, read_jsonl, scan_image_ids, split_rest_val, text_segment, vqa_soft_score, write_jsonl
from beit3.data.downstream.datasets import INDEX_FILES, CaptioningDataset, CIFARDataset, ClassificationDataset, ImageLoadError, NLVR2Dataset, RetrievalDataset, VQADataset, index_files, load_answer2label, load_image, text_segment_to_input
from beit3.data.text_tokenizer import TextTokenizer
from beit3.core.errors import UserError
from beit3.core.settings import add_flag, check_args

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


def _parse_image_dirs(pairs: list[str]) -> dict[str, str]:
    dirs = {}
    for pair in pairs:
        split, sep, folder = pair.partition("=")
        if not sep or split not in ("train", "val", "test", "test-dev"):
            raise UserError(f"--images-dir expects SPLIT=DIR with SPLIT in train/val/test/test-dev, got {pair!r}")
        dirs[split] = folder
    return dirs


def _vqa_split_flags(p: argparse.ArgumentParser) -> None:
    add_flag(p, "--min-answer-count", type=int, default=9, help="annotators an answer needs to enter the vocabulary",
             ge=1)
    add_flag(p, "--rest-val-images", type=int, default=1000, help="val images held out as rest_val", ge=0)
    add_flag(p, "--seed", type=int, default=0, ge=0, lt=2**32)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beit3 data downstream",
                                     description="Build the unilm/beit3 downstream index files.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, raw_help: str, spm: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name)
        p.add_argument("--raw", required=name != "captioning", help=raw_help)
        p.add_argument("--data-root", required=True,
                       help="folder the images live in; index image paths are relative to it")
        p.add_argument("--output", help="folder for the index files (default: --data-root)")
        if spm:
            p.add_argument("--spm", required=True, help="sentencepiece model (beit3.spm)")
        return p

    p = add("vqa", "folder with v2_OpenEnded_mscoco_*_questions.json and v2_mscoco_*_annotations.json")
    p.add_argument("--images-dir", action="append", default=[], metavar="SPLIT=DIR",
                   help="image folder of a split relative to --data-root (default train2014, val2014, test2015)")
    _vqa_split_flags(p)
    p = add("retrieval", "Karpathy split JSON (dataset_coco.json or dataset_flickr30k.json)")
    p.add_argument("--task", dest="retrieval_task", choices=("coco_retrieval", "flickr30k"),
                   help="default: flickr30k when the file name says flickr, else coco_retrieval")
    p.add_argument("--image-dir", help="image folder replacing each entry's filepath (Flickr30k: flickr30k-images)")
    p = add("captioning", "Karpathy split JSON dataset_coco.json")
    p.add_argument("--image-dir", help="image folder replacing each entry's filepath")
    p.add_argument("--nocaps-val", help="nocaps_val_4500_captions.json")
    p.add_argument("--nocaps-test", help="nocaps_test_image_info.json")
    add("nlvr2", "folder with the NLVR2 train.json, dev.json, test1.json (or a clone of lil-lab/nlvr)")
    add("imagenet", "folder with train/<class>/* and val/<class>/* (inside --data-root)", spm=False)
    p = add("all", "folder of raw files: vqa/, dataset_coco.json, nlvr2/, ... (see build_all_indexes)")
    _vqa_split_flags(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    from beit3.core.files import check_output_dir
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(parser, args)
        check_output_dir(args.output or args.data_root)
        return _build(args)
    except (ValueError, FileNotFoundError, UserError) as e:
        print(f"beit3 data downstream: error: {e}", file=sys.stderr)
        return 2


def _build(args: argparse.Namespace) -> int:
    out = args.output or args.data_root
    tok = TextTokenizer(args.spm) if getattr(args, "spm", None) else None
    if args.command == "vqa":
        counts = build_vqa_index(args.raw, args.data_root, tok, out, _parse_image_dirs(args.images_dir),
                                 args.min_answer_count, args.rest_val_images, args.seed)
    elif args.command == "retrieval":
        task = args.retrieval_task or ("flickr30k" if "flickr" in Path(args.raw).name.lower() else "coco_retrieval")
        counts = build_retrieval_index(args.raw, tok, out, task, args.image_dir)
    elif args.command == "captioning":
        counts = build_captioning_index(args.raw, tok, out, args.image_dir) if args.raw else {}
        for split, path in (("val", args.nocaps_val), ("test", args.nocaps_test)):
            counts |= build_nocaps_index(path, split, out) if path else {}
        if not counts:
            raise SystemExit("captioning: give --raw dataset_coco.json and/or --nocaps-val/--nocaps-test")
    elif args.command == "nlvr2":
        counts = build_nlvr2_index(args.raw, args.data_root, tok, out)
    elif args.command == "imagenet":
        counts = build_imagenet_index(Path(args.raw) / "train", Path(args.raw) / "val", args.data_root, out)
    else:
        counts = build_all_indexes(args.raw, args.data_root, args.spm, args.seed, args.min_answer_count,
                                   args.rest_val_images, out)
    print(f"wrote {len(counts)} files to {out}: " + ", ".join(f"{k} ({v})" for k, v in counts.items()))
    return 0


__all__ = [
    "build_all_indexes", "main", "build_vqa_index", "build_retrieval_index", "build_captioning_index",
    "build_nocaps_index", "build_nlvr2_index", "build_imagenet_index", "build_answer_vocab",
    "vqa_soft_score", "split_rest_val", "find_vqa_files", "scan_image_ids", "text_segment",
    "read_jsonl", "write_jsonl", "INDEX_FILES", "index_files", "VQADataset", "RetrievalDataset",
    "CaptioningDataset", "NLVR2Dataset", "ClassificationDataset", "CIFARDataset", "ImageLoadError",
    "load_image", "load_answer2label", "text_segment_to_input",
]


if __name__ == "__main__":
    raise SystemExit(main())
