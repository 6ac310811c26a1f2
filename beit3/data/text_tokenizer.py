"""SentencePiece text tokenizer with the id layout of the released BEiT-3 ``beit3.spm``.

BEiT-3 loads ``beit3.spm`` with ``transformers.XLMRobertaTokenizer``, i.e. the fairseq/XLM-R layout:

    <s>=0  <pad>=1  </s>=2  <unk>=3  piece k (k >= 3) -> k + 1  ...  <mask>=len(sp) + 1

The sentencepiece model itself must keep its defaults ``<unk>``=0, ``<s>``=1, ``</s>``=2: fairseq maps
sentencepiece id 0 to ``<unk>`` and shifts every other id by one, so ids 1 and 2 (control pieces,
never produced by encoding text) land on ``<pad>`` and ``</s>`` and are never emitted.

``train_spm`` trains such a model (``beit3 data spm``).
"""
from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence

import sentencepiece as spm
import torch

from beit3.core.errors import BadFileError, UserError, describe
from beit3.core.files import sha256_of

FAIRSEQ_OFFSET = 1  # fairseq prepends <s>, <pad>, </s>, <unk> and drops sentencepiece's own three


def train_spm(
    input_files: Sequence[str],
    model_prefix: str,
    vocab_size: int = 64000,
    model_type: str = "unigram",
    character_coverage: float = 0.9999,
    input_sentence_size: int = 10_000_000,
    seed: int = 0,
    num_threads: int | None = None,
) -> str:
    """Train a sentencepiece model on text files (one sentence a line); return the ``.model`` path.

    ``vocab_size`` is a soft limit (``hard_vocab_limit=False``): a corpus too small for it gives a
    smaller vocabulary with a warning instead of sentencepiece's "Vocabulary size too high" error.
    Training is deterministic for the same files, arguments and ``num_threads``.
    """
    files = [os.fspath(f) for f in input_files]
    if not files:
        raise ValueError("train_spm: no input files given")
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"train_spm: input file {f!r} does not exist")
        if "," in f:  # sentencepiece splits its `input` flag on commas
            raise ValueError(f"train_spm: input file name {f!r} must not contain a comma")
    out_dir = os.path.dirname(model_prefix)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    spm.set_random_generator_seed(seed)  # sentence sampling when the corpus exceeds input_sentence_size
    try:
        spm.SentencePieceTrainer.train(
            input=files,
            model_prefix=model_prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            hard_vocab_limit=False,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,  # the layout TextTokenizer relies on
            num_threads=num_threads or min(16, os.cpu_count() or 1),
            minloglevel=1,
        )
    except RuntimeError as e:
        raise ValueError(f"sentencepiece training on {files} failed: {e}") from e
    model_path = model_prefix + ".model"
    trained = spm.SentencePieceProcessor(model_file=model_path).get_piece_size()
    if trained < vocab_size:
        warnings.warn(f"corpus {files} supports only {trained} sentencepiece pieces, "
                      f"fewer than the {vocab_size} requested; {model_path} has {trained}")
    return model_path


def spm_digest(path: str | os.PathLike) -> str:
    """What identifies a SentencePiece model: the first 16 hex digits of its file's SHA-256 (its
    contents, not its path: a moved copy is the same model, a retrained one of the same size is not).
    Pretraining checkpoints and downstream index files record it."""
    return sha256_of(path)[:16]


class TokenizerMismatchError(UserError, ValueError):
    """Data or weights made with one SentencePiece model, used with another."""


def check_same_tokenizer(recorded: str, recorded_file: str, what: str, tokenizer: TextTokenizer | str,
                         fix: str = "") -> None:
    """Raise :class:`TokenizerMismatchError` unless ``tokenizer`` has the digest ``recorded``;
    ``what`` names what was made with ``recorded_file`` (``"data/vqa.train.jsonl was tokenized"``)."""
    path = tokenizer.model_file if isinstance(tokenizer, TextTokenizer) else os.fspath(tokenizer)
    digest = tokenizer.digest if isinstance(tokenizer, TextTokenizer) else spm_digest(path)
    if digest != recorded:
        raise TokenizerMismatchError(f"{what} with {recorded_file} (sha256 {recorded}), but the tokenizer here is "
                                     f"{path} (sha256 {digest}){'; ' + fix if fix else ''}")


class TextTokenizer:
    """Tokenizer over a sentencepiece ``.spm``/``.model`` file, ids as ``XLMRobertaTokenizer`` gives them."""

    bos_id = 0
    pad_id = 1
    eos_id = 2
    unk_id = 3

    def __init__(self, model_file: str | os.PathLike):
        self.model_file = os.fspath(model_file)
        if not os.path.isfile(self.model_file):
            raise FileNotFoundError(f"sentencepiece model {self.model_file!r} does not exist")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.model_file)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{self.model_file!r} is not a sentencepiece model: {e}") from e
        self._check_layout()

    def _check_layout(self) -> None:
        sp = self.sp
        ok = sp.get_piece_size() > 3 and sp.unk_id() == 0
        ok = ok and all(sp.is_control(i) or sp.is_unused(i) for i in (1, 2))
        if not ok:
            pieces = [sp.id_to_piece(i) for i in range(min(3, sp.get_piece_size()))]
            raise ValueError(
                f"sentencepiece model {self.model_file!r} starts with pieces {pieces}; the fairseq/XLM-R "
                "id layout needs <unk>=0 and control pieces at 1 and 2 (train with train_spm)")

    @functools.cached_property
    def digest(self) -> str:
        """``spm_digest`` of the model file."""
        return spm_digest(self.model_file)

    @property
    def mask_id(self) -> int:
        return self.sp.get_piece_size() + FAIRSEQ_OFFSET

    @property
    def vocab_size(self) -> int:
        return self.mask_id + 1

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Ids never masked, never drawn as random MLM replacements, skipped by ``decode`` (as HF's
        ``all_special_ids``, which includes ``<unk>``)."""
        return (self.bos_id, self.pad_id, self.eos_id, self.unk_id, self.mask_id)

    def _to_ids(self, sp_ids: list[int]) -> list[int]:
        return [i + FAIRSEQ_OFFSET if i else self.unk_id for i in sp_ids]

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        """``[<s>] + pieces + [</s>]``; with ``max_len`` the pieces are cut so ``</s>`` stays last."""
        return self._wrap(self._to_ids(self.sp.encode(_check_text(text))), max_len)

    def _wrap(self, ids: list[int], max_len: int | None) -> list[int]:
        if max_len is not None:
            if max_len < 2:
                raise ValueError(f"max_len={max_len} leaves no room for <s> and </s>; need >= 2")
            ids = ids[: max_len - 2]
        return [self.bos_id, *ids, self.eos_id]

    def batch_encode(self, texts: Sequence[str], max_len: int,
                     pad_to_max: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and right-pad a batch.

        Returns ``ids`` LongTensor (B, L) and ``padding_mask`` BoolTensor (B, L), True at padding;
        L = ``max_len`` if ``pad_to_max`` else the longest encoded text (at most ``max_len``).
        """
        if isinstance(texts, str):
            raise TypeError("batch_encode expects a sequence of strings, got a single str")
        pieces = self.sp.encode([_check_text(t) for t in texts])
        seqs = [self._wrap(self._to_ids(p), max_len) for p in pieces]
        width = max_len if pad_to_max else max((len(s) for s in seqs), default=0)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        padding_mask = torch.arange(width)[None, :] >= lengths[:, None]
        return ids, padding_mask

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of ``ids``, skipping ``special_ids``."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        special = set(self.special_ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids {bad[:5]} out of range [0, {self.vocab_size}) for {self.model_file!r}")
        return self.sp.decode([i - FAIRSEQ_OFFSET for i in ids if i not in special])

    def __len__(self) -> int:
        return self.vocab_size


def _check_text(text: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"expected text as str, got {type(text).__name__}: {text!r:.80}")
    return text


def check_corpus(files: Sequence[str]) -> None:
    """Every input an existing file with some text in its first block (sentencepiece's own
    errors for an empty corpus are internal assertions)."""
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--input {describe(path)}: not a file")
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        if not head.strip():
            raise BadFileError(path, "no text in it (empty or blank lines only); sentencepiece needs sentences")
