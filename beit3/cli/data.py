"""``beit3 data <step>``: data preparation, one parser and one entry point per step.

    beit3 data synthetic --output DIR                  the synthetic world (``beit3.data.synthetic.world``)
    beit3 data shards --images DIR --output DIR        pretraining shards (``beit3.data.shards``)
    beit3 data downstream {vqa,...,all} ...            the unilm/beit3 index files (``beit3.data.downstream``)
    beit3 data spm --input FILE... --output PREFIX     the SentencePiece model (``beit3.data.text_tokenizer``)
    beit3 data cifar --src DIR --output DIR            CIFAR pickles of an ImageFolder tree (``beit3.data.cifar_format``)

``python -m beit3.cli.data <step> ...`` is ``beit3 data <step> ...``.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from beit3.cli import main as dispatch
from beit3.core.errors import OutputError, UserError, first_line, report
from beit3.core.files import check_output_dir, check_output_file
from beit3.core.settings import SettingError, add_flag, check_args
from beit3.data import shards
from beit3.data.cifar_format import cifar_from_image_folder
from beit3.data.downstream import build_all_indexes
from beit3.data.downstream.build import (build_captioning_index, build_imagenet_index, build_nlvr2_index,
                                         build_nocaps_index, build_retrieval_index, build_vqa_index)
from beit3.data.synthetic.world import make_synthetic_world
from beit3.data.text_tokenizer import TextTokenizer, check_corpus, train_spm


# -- beit3 data synthetic ------------------------------------------------------------------------
def synthetic_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beit3 data synthetic", description="Write the synthetic world "
                                     "(images, raw task annotations, corpus, SentencePiece model, shards).")
    parser.add_argument("--output", required=True, help="new or empty folder (or a previous world, replaced)")
    add_flag(parser, "--num-images", type=int, default=2000, help="one per split at least", ge=3)
    add_flag(parser, "--seed", type=int, default=0, ge=0, lt=2**32)
    add_flag(parser, "--image-size", type=int, default=64, help="shortest image side in pixels", ge=32)
    add_flag(parser, "--max-image-size", type=int, default=None, help="longest side (default 1.5 x --image-size)",
             ge=32)
    parser.add_argument("--image-format", choices=("png", "jpg"), default="png")
    add_flag(parser, "--num-nlvr2-pairs", type=int, default=None, help="default --num-images // 4", ge=6)
    add_flag(parser, "--shards-per-kind", type=int, default=32, ge=1)
    return parser


def synthetic_main(argv: list[str] | None = None) -> int:
    parser = synthetic_parser()
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        check_args(parser, args)
        check_output_dir(args.output)
        counts = make_synthetic_world(args.output, args.num_images, args.image_size, args.seed,
                                      max_image_size=args.max_image_size, image_format=args.image_format,
                                      num_nlvr2_pairs=args.num_nlvr2_pairs, shards_per_kind=args.shards_per_kind)
    except (ValueError, FileExistsError, UserError) as e:
        print(f"beit3 data synthetic: error: {e}", file=sys.stderr)
        return 2
    print(f"synthetic world in {args.output} ({time.perf_counter() - start:.1f}s): "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


# -- beit3 data shards ---------------------------------------------------------------------------
def shards_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beit3 data shards", description=shards.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images (searched recursively)")
    src.add_argument("--captions", help='captions with image paths or URLs: JSON lines {"image", "caption"}, '
                                        "COCO captions or Karpathy-split JSON, CSV/TSV or parquet")
    src.add_argument("--texts", nargs="+", help="text files, one document a line")
    parser.add_argument("--image-root", help="--captions: folder the image paths are relative to "
                                             "(default: the captions file's)")
    parser.add_argument("--url-col", help="--captions table: the image path or URL column")
    parser.add_argument("--caption-col", help="--captions table: the caption column")
    parser.add_argument("--split", nargs="+", help="--captions Karpathy JSON: keep these splits (e.g. train restval)")
    add_flag(parser, "--download-timeout", type=float, default=shards.DOWNLOAD_TIMEOUT,
             help="--captions with URLs: seconds for one image's download, a stalled or trickling "
                  f"server included (default {shards.DOWNLOAD_TIMEOUT:g}); such an image is skipped and counted",
             gt=0)
    parser.add_argument("--output", required=True, help="folder for the shards and manifest.json")
    parser.add_argument("--kind", help="shard name prefix (default: images, pairs or texts after the source)")
    add_flag(parser, "--shard-size", type=int, default=shards.DEFAULT_SHARD_SIZE, help="max samples per shard", ge=1)
    add_flag(parser, "--max-bytes", type=float, default=None,
             help="close a shard once its samples hold this many bytes (e.g. 1e9)", gt=0)
    return parser


def shards_main(argv: list[str] | None = None) -> int:
    parser = shards_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    start = time.perf_counter()
    try:
        check_args(parser, args)
        check_output_dir(args.output)
    except (OutputError, SettingError) as e:
        return report("beit3 data shards", e, 2)
    try:
        options = {"image_root": args.image_root, "url_col": args.url_col, "caption_col": args.caption_col,
                   "split": args.split, "download_timeout": args.download_timeout}
        entry = shards.write_shards(args.output, images=args.images, captions=args.captions, texts=args.texts,
                                    kind=args.kind, shard_size=args.shard_size, max_bytes=args.max_bytes,
                                    caption_options={k: v for k, v in options.items() if v is not None})
    except (shards.ShardError, UserError) as e:
        return report("beit3 data shards", e, 2)
    print(f"{args.output}: {entry['num_samples']} {entry['content']} samples in {len(entry['shards'])} shards, "
          f"{entry['num_bytes'] / 1e6:.1f} MB, {entry['skipped']} inputs skipped, "
          f"{time.perf_counter() - start:.1f}s")
    return 0


# -- beit3 data downstream -----------------------------------------------------------------------
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


def downstream_parser() -> argparse.ArgumentParser:
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


def downstream_main(argv: list[str] | None = None) -> int:
    parser = downstream_parser()
    args = parser.parse_args(argv)
    try:
        check_args(parser, args)
        check_output_dir(args.output or args.data_root)
        return _build_indexes(args)
    except (ValueError, FileNotFoundError, UserError) as e:
        print(f"beit3 data downstream: error: {e}", file=sys.stderr)
        return 2


def _build_indexes(args: argparse.Namespace) -> int:
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


# -- beit3 data spm ------------------------------------------------------------------------------
def spm_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beit3 data spm", description="Train the sentencepiece model for BEiT-3 text (XLM-R id layout).")
    parser.add_argument("--input", nargs="+", required=True, help="text files, one sentence a line")
    parser.add_argument("--output", required=True, help="model prefix; writes PREFIX.model, PREFIX.vocab")
    add_flag(parser, "--vocab-size", type=int, default=64000, help="pieces (a soft limit)", ge=8)
    parser.add_argument("--model-type", default="unigram", choices=("unigram", "bpe", "char", "word"))
    add_flag(parser, "--character-coverage", type=float, default=0.9999, gt=0, le=1)
    add_flag(parser, "--input-sentence-size", type=int, default=10_000_000, help="sentences sampled (0: all)", ge=0)
    add_flag(parser, "--seed", type=int, default=0, ge=0, lt=2**32)
    return parser


def spm_main(argv: list[str] | None = None) -> int:
    parser = spm_parser()
    args = parser.parse_args(argv)
    try:
        check_args(parser, args)
        check_output_file(args.output + ".model")
        check_corpus(args.input)
        path = train_spm(args.input, args.output, vocab_size=args.vocab_size, model_type=args.model_type,
                         character_coverage=args.character_coverage,
                         input_sentence_size=args.input_sentence_size, seed=args.seed)
        tok = TextTokenizer(path)
    except (FileNotFoundError, ValueError, UserError) as e:
        return report("beit3 data spm", first_line(e), 2)
    print(f"{path}: {tok.sp.get_piece_size()} sentencepiece pieces, vocab_size {tok.vocab_size} "
          f"(with <s> <pad> </s> <unk> <mask>)")
    return 0


# -- beit3 data cifar ----------------------------------------------------------------------------
def cifar_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="beit3 data cifar", description="Write an ImageFolder tree "
                                 "(SRC/train, SRC/val) as a CIFAR-10 or CIFAR-100 python-pickle folder.")
    ap.add_argument("--src", required=True, help="e.g. the synthetic world's classification/ folder")
    ap.add_argument("--output", required=True)
    ap.add_argument("--kind", choices=["cifar10", "cifar100"], default="cifar10")
    ap.add_argument("--coarse-by-shape", action="store_true",
                    help="CIFAR-100 superclasses from '{color}_{shape}' class names (the synthetic world's)")
    return ap


def cifar_main(argv: list[str] | None = None) -> int:
    args = cifar_parser().parse_args(argv)
    coarse_of = (lambda c: c.rsplit("_", 1)[-1]) if args.coarse_by_shape else None
    try:
        check_output_dir(args.output)
        out = cifar_from_image_folder(args.src, args.output, args.kind, coarse_of)
    except (FileNotFoundError, ValueError, UserError) as e:
        print(f"beit3 data cifar: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``beit3 data <step> ...`` (the steps are the dispatcher's ``DATA_COMMANDS``)."""
    return dispatch(["data", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
