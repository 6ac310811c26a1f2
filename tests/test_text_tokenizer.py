import os
import random
import shutil

import pytest
import sentencepiece as spm
import torch

from beit3.cli.data import spm_main as main
from beit3.data.text_tokenizer import TextTokenizer, train_spm

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the reference tokenizer loads from a local folder

WORDS = ("the a an of to in on with by for cat dog bird horse man woman child people street city "
         "river mountain tree car bus train red blue green small large old young sits runs jumps "
         "stands holds looks walks plays rides eats near under over beside picture photo image "
         "table kitchen beach field snow water grass sky building window door").split()


def _sentences(n: int, seed: int) -> list[str]:
    r = random.Random(seed)
    out = []
    for _ in range(n):
        words = [r.choice(WORDS) for _ in range(r.randint(3, 14))]
        if r.random() < 0.3:
            words.insert(r.randrange(len(words)), str(r.randint(0, 999)))
        out.append(" ".join(words).capitalize() + r.choice(".!?,"))
    return out


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(_sentences(400, seed=0)) + "\n", encoding="utf-8")
    with pytest.warns(UserWarning, match="fewer than the 1000 requested"):
        path = train_spm([str(corpus)], str(d / "tiny"), vocab_size=1000)
    return path


@pytest.fixture(scope="module")
def tok(spm_model):
    return TextTokenizer(spm_model)


@pytest.fixture(scope="module")
def reference(spm_model, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("xlmr")
    shutil.copy(spm_model, d / "sentencepiece.bpe.model")  # the file name XLM-R checkpoints use
    return transformers.XLMRobertaTokenizer.from_pretrained(str(d))


EDGE_CASES = [
    "", " ", "The cat sits on the table.", "  leading   and\ttrailing  spaces \n",
    "Zebra quokka axolotl",  # words never seen
    "über naïve café", "猫が座っている", "emoji 🐱🐶 here", "ｆｕｌｌ ｗｉｄｔｈ ＡＢＣ",  # unseen / NFKC characters
    "CATCATCAT dogdogdog", "12345 67.89", "a" * 50, "Q" * 7 + " " + "§±" * 3,
]


def test_ids_match_xlm_roberta_tokenizer(tok, reference):
    sentences = EDGE_CASES + _sentences(300, seed=1)
    assert len(reference) == tok.vocab_size
    assert reference.mask_token_id == tok.mask_id == tok.sp.get_piece_size() + 1
    assert (reference.bos_token_id, reference.pad_token_id, reference.eos_token_id,
            reference.unk_token_id) == (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert set(reference.all_special_ids) == set(tok.special_ids)
    for s in sentences:
        assert tok.encode(s) == reference(s)["input_ids"], repr(s)
    unk_seen = sum(tok.unk_id in tok.encode(s) for s in EDGE_CASES)
    assert unk_seen >= 3  # the edge cases do exercise <unk>


def test_truncation_keeps_bos_and_eos(tok, reference):
    s = " ".join(WORDS)
    full = tok.encode(s)
    assert len(full) > 20
    for max_len in (2, 3, 10, len(full), len(full) + 5):
        ids = tok.encode(s, max_len=max_len)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert len(ids) == min(max_len, len(full))
        assert ids[1:-1] == full[1: len(ids) - 1]
    ref = reference(s, truncation=True, max_length=10)["input_ids"]
    assert tok.encode(s, max_len=10) == ref
    with pytest.raises(ValueError, match="max_len=1"):
        tok.encode(s, max_len=1)


def test_batch_encode_padding(tok):
    texts = ["a cat", "The old man rides a red bus near the river.", "", " ".join(WORDS)]
    ids, pad = tok.batch_encode(texts, max_len=16)
    singles = [tok.encode(t, max_len=16) for t in texts]
    assert ids.dtype == torch.long and pad.dtype == torch.bool
    assert ids.shape == pad.shape == (4, max(len(s) for s in singles)) == (4, 16)
    for row, single in enumerate(singles):
        assert ids[row, : len(single)].tolist() == single
        assert not pad[row, : len(single)].any() and pad[row, len(single):].all()
        assert (ids[row, len(single):] == tok.pad_id).all()

    ids, pad = tok.batch_encode(texts[:3], max_len=64)
    assert ids.shape[1] == len(singles[1])  # padded to the longest, not to max_len
    ids, pad = tok.batch_encode(texts[:3], max_len=64, pad_to_max=True)
    assert ids.shape == (3, 64) and pad.sum().item() == 3 * 64 - sum(len(s) for s in singles[:3])


def test_decode_round_trip(tok, reference):
    for s in _sentences(50, seed=2) + ["  spaced   out  words "]:
        ids = tok.encode(s)
        assert tok.decode(ids) == " ".join(s.split())
        assert tok.decode(torch.tensor(ids)) == reference.decode(ids, skip_special_tokens=True)
    assert tok.decode([tok.bos_id, tok.mask_id, tok.pad_id, tok.eos_id]) == ""
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])


def test_bad_model_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        TextTokenizer(tmp_path / "missing.model")
    junk = tmp_path / "junk.spm"
    junk.write_text("not a model")
    with pytest.raises(ValueError, match="junk.spm' is not a sentencepiece model"):
        TextTokenizer(junk)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(_sentences(100, seed=0)), encoding="utf-8")
    # <unk> away from id 0 breaks the fairseq mapping (sentencepiece id 0 -> <unk>)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "hf_layout"), vocab_size=60,
                                   bos_id=0, pad_id=1, eos_id=2, unk_id=3, minloglevel=2)
    with pytest.raises(ValueError, match="needs <unk>=0"):
        TextTokenizer(tmp_path / "hf_layout.model")


def test_training_is_deterministic_and_cli(tmp_path, spm_model, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(_sentences(400, seed=0)) + "\n", encoding="utf-8")
    with pytest.warns(UserWarning):
        assert main(["--input", str(corpus), "--output", str(tmp_path / "out" / "tiny"),
                     "--vocab-size", "1000"]) == 0
    out = capsys.readouterr().out
    again = TextTokenizer(tmp_path / "out" / "tiny.model")
    assert f"vocab_size {again.vocab_size}" in out
    first = TextTokenizer(spm_model)
    n = first.sp.get_piece_size()
    assert again.sp.get_piece_size() == n
    assert [(first.sp.id_to_piece(i), first.sp.get_score(i)) for i in range(n)] == \
           [(again.sp.id_to_piece(i), again.sp.get_score(i)) for i in range(n)]
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        train_spm([str(tmp_path / "nope.txt")], str(tmp_path / "x"))


def test_an_empty_corpus_is_one_line(tmp_path, capsys):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    for name, size in (("empty.txt", 0), ("blank.txt", 5)):
        assert main(["--input", str(tmp_path / name), "--output", str(tmp_path / "out" / "m")]) == 2
        assert capsys.readouterr().err == (f"beit3 data spm: error: {tmp_path / name} ({size} bytes): no text in it "
                                           "(empty or blank lines only); sentencepiece needs sentences\n")
    assert not (tmp_path / "out" / "m.model").exists()
