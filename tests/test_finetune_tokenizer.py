"""Fine-tuning uses the tokenizer its data and weights were made with: index files tokenized by
another SentencePiece model are refused, ``--init <pretraining run>/final`` brings its own
tokenizer (no ``--spm`` needed), and an ``--spm`` other than the one saved with ``--init`` is
refused; each refusal is one line naming both models."""
import os

from finetune_helpers import COMMON

from beit3.data.text_tokenizer import spm_digest
from beit3.cli.finetune import main as finetune_main

FINAL = "final"


def _lines(err):
    return [line for line in err.splitlines() if "error" in line or "Traceback" in line]


def test_an_index_of_another_tokenizer_is_refused(data, assets, tmp_path, capsys):
    out = tmp_path / "run"
    rc = finetune_main(["--task", "vqa", "--preset", "tiny", "--data", data.world, "--spm", assets[0],
                        "--output", str(out), *COMMON])
    lines = _lines(capsys.readouterr().err)
    assert rc == 1 and len(lines) == 1, lines
    index = os.path.join(data.world, "vqa.train.jsonl")
    assert lines[0] == (f"beit3 finetune: error: {index} was tokenized with {os.path.abspath(data.spm)} "
                        f"(sha256 {spm_digest(data.spm)}), but the tokenizer here is {assets[0]} (sha256 "
                        f"{spm_digest(assets[0])}); give that model as --spm, or rebuild the index files with "
                        "beit3 data downstream --spm (this one)")
    assert not (out / "best").exists()


def test_init_from_a_pretraining_run_brings_its_tokenizer(data, pretrained_tiny, assets, tmp_path, capsys):
    final = str(pretrained_tiny / FINAL)
    rc = finetune_main(["--task", "vqa", "--init", final, "--data", data.world, "--output", str(tmp_path / "run"),
                        *COMMON, "--max-steps", "2"])
    assert rc == 0
    with open(tmp_path / "run" / "best" / "tokenizer.model", "rb") as a, open(data.spm, "rb") as b:
        assert a.read() == b.read()
    capsys.readouterr()
    rc = finetune_main(["--task", "vqa", "--init", final, "--data", data.world, "--spm", assets[0],
                        "--output", str(tmp_path / "other"), *COMMON, "--max-steps", "2"])
    lines = _lines(capsys.readouterr().err)
    assert rc == 1 and len(lines) == 1, lines
    saved = os.path.join(final, "tokenizer.model")
    assert lines[0] == (f"beit3 finetune: error: --init {final} was trained with {saved} "
                        f"(sha256 {spm_digest(data.spm)}), but the tokenizer here is {assets[0]} (sha256 "
                        f"{spm_digest(assets[0])}); leave out --spm to use the model's own")
    assert not (tmp_path / "other" / "best").exists()
