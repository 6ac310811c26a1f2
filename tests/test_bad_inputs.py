"""Hostile but realistic inputs: planted pickles, damaged checkpoints, another run's settings, two
runs at one folder, kills at chosen moments, bad files and paths, a full disk, bad samples.

Each case asserts the exit code, the one line that names the problem, and that the good files are
as they were. A full disk is simulated by making the write fail halfway with ENOSPC (the writer's
own error path is what is tested; the partial file it leaves is real).
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from finetune_helpers import COMMON, evaluate, finetune
from pretrain_fixtures import IndexedBatches, run_args
from PIL import Image

from beit3.data.downstream.datasets import CIFARDataset
from beit3.data.text_tokenizer import train_spm
from beit3.core.errors import BadFileError, OutputError
from beit3.cli.export import main as export_main
from beit3.cli.finetune import main as finetune_main
from beit3.model.saved import save_folder
from beit3.cli.pretrain import check_args, run_with_errors
from beit3.trainer.checkpoint import MARKER, complete_checkpoints, file_crc32, latest_checkpoint
from beit3.jobs.pretrain.loop import PretrainRun
from beit3.jobs.pretrain.config import PretrainConfig
from beit3.trainer.run_dir import OutputLock
from beit3.vqkd.vqkd import VQKD, VQKDConfig, save_trained

pytestmark = pytest.mark.usefixtures("one_thread")
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


class WritesFileWhenUnpickled:
    """Unpickling this runs ``open(path, "a")``, creating the file: a malicious checkpoint's payload
    (appending, as DeepSpeed unpickles a file more than once)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "a")


def error_line(err: str, prog: str, *needles: str) -> str:
    """The single ``<prog>: error:`` line of ``err``, which holds every needle; no traceback."""
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def snapshot(folder, names=("run_config.json", "metrics.jsonl")) -> dict:
    return {n: open(os.path.join(folder, n), "rb").read() for n in names if os.path.exists(os.path.join(folder, n))}


def leftovers(folder) -> list:
    return [n for n in os.listdir(folder) if ".tmp" in n or n.endswith(".old")]


# -- pretraining ------------------------------------------------------------------------------------
def pretrain(out, assets, *flags, steps=2):
    """``beit3 pretrain`` on IndexedBatches in this process; returns the exit code."""
    spm, tok = assets
    args = run_args(str(out), spm, tok, extra=flags, steps=steps, batch_images=2, batch_texts=2, batch_pairs=2,
                    log_every=1, save_every=1, keep_last=1, drop_path=0.0)
    return run_with_errors(PretrainRun(args, check_args(args, 1), "cpu",
                                       data=IndexedBatches(spm, 0, 1, 1, sizes=(2, 2, 2))), args)


@pytest.fixture(scope="module")
def pretrained(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrained") / "run"
    assert pretrain(out, assets) == 0
    return out


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return str(dst), latest_checkpoint(os.path.join(dst, "checkpoints"))


def reseal(ckpt):
    """Rewrite the marker's file sizes and digests, as an attacker who planted a file would."""
    marker = os.path.join(ckpt, MARKER)
    meta = json.load(open(marker))
    meta["files"] = {n: os.path.getsize(os.path.join(ckpt, n)) for n in meta["files"]}
    meta["digests"] = {n: file_crc32(os.path.join(ckpt, n)) for n in meta["digests"]}
    json.dump(meta, open(marker, "w"))


def tree(folder) -> dict:
    """{path: bytes} of every file under ``folder`` but its lock (emptied when a run lets it go)."""
    return {os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(folder) for n in names if n != ".lock"}


def test_pickles_planted_in_a_checkpoint_do_not_run(pretrained, assets, tmp_path, capsys):
    out, ckpt = copy_run(pretrained, tmp_path / "run")
    before = snapshot(out)
    rank0 = os.path.join(ckpt, "rank_0.pt")
    good_rank0 = open(rank0, "rb").read()
    state = torch.load(rank0, weights_only=True)
    torch.save({**state, "note": WritesFileWhenUnpickled(tmp_path / "pwned_by_rank_file")}, rank0)
    reseal(ckpt)
    assert pretrain(out, assets, "--resume", "auto") == 1
    error_line(capsys.readouterr().err, "beit3 pretrain", "rank_0.pt", "io.open", "--allow-pickle")
    assert not os.path.exists(tmp_path / "pwned_by_rank_file") and snapshot(out) == before

    open(rank0, "wb").write(good_rank0)
    states = next(os.path.join(ckpt, n) for n in os.listdir(ckpt) if n.endswith("model_states.pt"))
    sd = torch.load(states, weights_only=False)  # our own file: trusted here
    torch.save({**sd, "note": WritesFileWhenUnpickled(tmp_path / "pwned_by_deepspeed_file")}, states)
    reseal(ckpt)
    assert pretrain(out, assets, "--resume", "auto") == 1
    error_line(capsys.readouterr().err, "beit3 pretrain", "model_states.pt", "beyond DeepSpeed's own",
               "--allow-pickle")
    assert not os.path.exists(tmp_path / "pwned_by_deepspeed_file") and snapshot(out) == before

    # The payload is live: the user's opt-in runs it, so the refusals above are what stopped it.
    with pytest.warns(UserWarning, match="full unpickling"):
        assert pretrain(out, assets, "--resume", "auto", "--allow-pickle") == 0
    assert os.path.isfile(tmp_path / "pwned_by_deepspeed_file")


def test_a_damaged_checkpoint_is_named_and_the_run_folder_is_left_alone(pretrained, assets, tmp_path, capsys):
    out, ckpt = copy_run(pretrained, tmp_path / "run")
    before, marker = snapshot(out), os.path.join(ckpt, MARKER)
    optim = next(os.path.join(ckpt, n) for n in os.listdir(ckpt) if n.endswith("optim_states.pt"))
    size = os.path.getsize(optim)

    os.rename(os.path.join(ckpt, "rank_0.pt"), tmp_path / "rank_0.pt")  # a rank's file lost
    assert pretrain(out, assets, "--resume", "auto") == 1
    error_line(capsys.readouterr().err, "beit3 pretrain", f"checkpoint {ckpt} is damaged", "rank_0.pt is missing")
    os.rename(tmp_path / "rank_0.pt", os.path.join(ckpt, "rank_0.pt"))

    with open(optim, "r+b") as f:  # a copy cut short
        f.truncate(size // 2)
    assert pretrain(out, assets, "--resume", "auto") == 1
    error_line(capsys.readouterr().err, "beit3 pretrain",
               f"{os.path.basename(optim)} has {size // 2:,} bytes, {size:,} when written")

    open(marker, "w").write('{"step": 2, "files": {')  # the marker itself garbled
    assert pretrain(out, assets, "--resume", "auto") == 1
    error_line(capsys.readouterr().err, "beit3 pretrain", f"{marker} (", "bytes): not valid JSON")
    assert snapshot(out) == before and os.path.getsize(optim) == size // 2  # nothing rewritten or removed


def test_changed_bytes_in_a_checkpoint_file_are_named_and_nothing_resumes(pretrained, assets, tmp_path, capsys):
    out, ckpt = copy_run(pretrained, tmp_path / "run")
    optim = next(os.path.join(ckpt, n) for n in os.listdir(ckpt) if n.endswith("optim_states.pt"))
    good, size = open(optim, "rb").read(), os.path.getsize(optim)
    with open(optim, "r+b") as f:  # 4 KiB of noise in the middle of the optimizer states: the size holds
        f.seek(size // 2 - 2048)
        f.write(os.urandom(4096))
    before = tree(out)
    assert os.path.getsize(optim) == size
    assert pretrain(out, assets, "--resume", "auto", steps=3) == 1
    error_line(capsys.readouterr().err, "beit3 pretrain", f"checkpoint {ckpt} is damaged",
               f"{os.path.basename(optim)} does not hold the bytes written (crc32:", "cannot be resumed")
    assert tree(out) == before

    # A checkpoint written before digests were recorded: its sizes alone are checked, and it resumes.
    open(optim, "wb").write(good)
    meta = json.load(open(os.path.join(ckpt, MARKER)))
    assert sorted(meta["digests"]) == sorted(meta["files"])
    del meta["digests"]
    json.dump(meta, open(os.path.join(ckpt, MARKER), "w"))
    assert pretrain(out, assets, "--resume", "auto", steps=3) == 0
    assert [s for s, _ in complete_checkpoints(os.path.join(out, "checkpoints"))] == [3]


def test_a_finished_pretraining_run_is_refused_resumed_or_moved_aside(pretrained, assets, tmp_path, capsys):
    out, _ = copy_run(pretrained, tmp_path / "run")
    before = tree(out)
    assert pretrain(out, assets) == 1  # the same command again, without --resume
    error_line(capsys.readouterr().err, "beit3 pretrain",
               f"{out} holds a run (checkpoint checkpoints/step_00000002, final/, run_config.json, metrics.jsonl); "
               f"continue it with --resume auto, give another --output, or replace it with --overwrite")
    assert tree(out) == before
    assert pretrain(out, assets, "--overwrite", "--resume", "auto") == 1
    error_line(capsys.readouterr().err, "beit3 pretrain", "--overwrite", "--resume auto", "give one")
    assert tree(out) == before

    assert pretrain(out, assets, "--resume", "auto", steps=3) == 0
    resumed = tree(out)
    assert json.loads(resumed["final/meta.json"])["step"] == 3
    assert [json.loads(line)["step"] for line in resumed["metrics.jsonl"].splitlines()] == [1, 2, 3]

    assert pretrain(out, assets, "--overwrite") == 0
    [aside] = [n for n in os.listdir(out) if n.startswith("replaced-")]
    assert tree(os.path.join(out, aside)) == resumed  # the old run, whole, apart from the new one
    new = {k: v for k, v in tree(out).items() if not k.startswith(aside)}
    assert [json.loads(line)["step"] for line in new["metrics.jsonl"].splitlines()] == [1, 2]
    assert json.loads(new["final/meta.json"])["step"] == 2
    assert {k.split("/")[1] for k in new if k.startswith("checkpoints/step_")} == {"step_00000002"}
    # Recorded, but a --config replay of this run replaces nothing unless its own command line says so.
    assert json.loads(new["run_config.json"])["args"]["run"]["overwrite"] is True
    assert "overwrite" not in PretrainConfig.from_file(os.path.join(out, "run_config.json"))


def test_resuming_with_other_settings_is_refused_before_building(pretrained, assets, tmp_path, capsys,
                                                                  monkeypatch):
    out, _ = copy_run(pretrained, tmp_path / "run")
    before = snapshot(out)

    def no_model(*a, **kw):
        raise AssertionError("a model was built before the checkpoint was compared")
    monkeypatch.setattr("beit3.jobs.pretrain.loop.MaskedDataModeling", no_model)
    assert pretrain(out, assets, "--resume", "auto", "--layout", "released") == 1
    error_line(capsys.readouterr().err, "beit3 pretrain", "belongs to another run",
               "layout 'paper' in the checkpoint, 'released' now")
    assert pretrain(out, assets, "--resume", "auto", "--preset", "base") == 1
    error_line(capsys.readouterr().err, "beit3 pretrain", "preset 'tiny' in the checkpoint, 'base' now",
               "model.embed_dim 192 in the checkpoint, 768 now")
    # Another visual tokenizer (its codebook is the MIM head's classes) or text tokenizer (vocabulary).
    other_vqkd = str(tmp_path / "vqkd32")
    save_trained(VQKD(VQKDConfig.from_preset("tiny", num_codes=32)), other_vqkd)
    assert pretrain(out, (assets[0], other_vqkd), "--resume", "auto") == 1
    error_line(capsys.readouterr().err, "beit3 pretrain", "num_visual_tokens 64 in the checkpoint, 32 now",
               "visual_tokenizer_sha256")
    # A retrained tokenizer of the same size: told apart by its content.
    save_trained(VQKD(VQKDConfig.from_preset("tiny", num_codes=64)), other_vqkd)
    assert pretrain(out, (assets[0], other_vqkd), "--resume", "auto") == 1
    line = error_line(capsys.readouterr().err, "beit3 pretrain", "visual_tokenizer_sha256 '")
    assert "num_visual_tokens" not in line
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"two green triangles above {i} small circles\n" for i in range(300)))
    other_spm = train_spm([str(corpus)], str(tmp_path / "spm"), vocab_size=40)
    assert pretrain(out, (other_spm, assets[1]), "--resume", "auto") == 1
    error_line(capsys.readouterr().err, "beit3 pretrain", "text_tokenizer_sha256 '")
    shutil.copy(assets[0], tmp_path / "moved.model")  # the same tokenizer elsewhere is the same tokenizer
    assert snapshot(out) == before
    monkeypatch.undo()
    assert pretrain(out, (str(tmp_path / "moved.model"), assets[1]), "--resume", "auto", steps=3) == 0


HOLD_LOCK = textwrap.dedent("""
    import sys
    from beit3.trainer.run_dir import OutputLock
    lock = OutputLock(sys.argv[1])
    print("locked", flush=True)
    sys.stdin.read()
""")


def test_a_second_run_on_one_output_is_refused_with_the_holder(assets, data, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env=ENV, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        holder_id = f"pid {holder.pid} on host {socket.gethostname()}"
        assert pretrain(out, assets) == 1
        error_line(capsys.readouterr().err, "beit3 pretrain", f"{out} is in use by another run ({holder_id}")
        assert finetune_main(["--task", "classification", "--preset", "tiny", "--data", data.world, "--spm",
                              data.spm, "--output", str(out), *COMMON]) == 1
        error_line(capsys.readouterr().err, "beit3 finetune", holder_id)
        assert os.listdir(out) == [".lock"]  # neither wrote anything
    finally:
        holder.kill()
        holder.wait()
    OutputLock(str(out)).release()  # the kernel dropped the dead holder's lock: nothing stale


# -- fine-tuning: resume, best/ -----------------------------------------------------------------------
SMALL = ["--max-steps", "2", "--img-size", "40"]  # 32 px and less is CIFAR's size: no eval resize
@pytest.fixture(scope="module")
def finetuned(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetuned") / "run"
    return finetune("classification", data, None, out, *SMALL, "--save-every", "1")


def test_finetune_resume_checks_the_checkpoint_and_the_task(finetuned, data, tmp_path, capsys):
    out, ckpt = copy_run(finetuned, tmp_path / "run")
    before = snapshot(out)
    common = ["--data", data.world, "--spm", data.spm, "--output", out, *COMMON, *SMALL, "--resume", "auto"]
    assert finetune_main(["--task", "retrieval", "--preset", "tiny", *common]) == 1
    error_line(capsys.readouterr().err, "beit3 finetune", "task 'classification' in the checkpoint, 'retrieval' now")
    os.remove(os.path.join(ckpt, "rank_0.pt"))
    assert finetune_main(["--task", "classification", "--preset", "tiny", *common]) == 1
    error_line(capsys.readouterr().err, "beit3 finetune", "rank_0.pt is missing")
    assert snapshot(out) == before


def test_a_finished_finetuning_run_is_refused_resumed_or_moved_aside(finetuned, data, tmp_path, capsys):
    out, _ = copy_run(finetuned, tmp_path / "run")
    before = tree(out)
    command = ["--task", "classification", "--preset", "tiny", "--data", data.world, "--spm", data.spm,
               "--output", out, *COMMON, *SMALL]
    assert finetune_main(command) == 1
    error_line(capsys.readouterr().err, "beit3 finetune",
               f"{out} holds a run (checkpoint checkpoints/step_00000002, best/, run_config.json, metrics.jsonl); "
               f"continue it with --resume auto, give another --output, or replace it with --overwrite")
    assert tree(out) == before
    assert finetune_main([*command, "--resume", "auto"]) == 0  # resumed at its last step: nothing left to do
    resumed = tree(out)
    assert resumed["best/model.safetensors"] == before["best/model.safetensors"]
    assert finetune_main([*command, "--overwrite"]) == 0
    [aside] = [n for n in os.listdir(out) if n.startswith("replaced-")]
    assert tree(os.path.join(out, aside)) == resumed
    new = {k: v for k, v in tree(out).items() if not k.startswith(aside)}
    assert {"best/model.safetensors", "run_config.json", "metrics.jsonl"} <= set(new)
    assert [json.loads(line)["step"] for line in new["metrics.jsonl"].splitlines() if b'"loss"' in line] == [2]


REPLACE_BEST_AND_DIE = textwrap.dedent("""
    import json, os, signal, sys
    from safetensors.torch import load_file
    from beit3.model.saved import save_folder
    best = os.path.join(sys.argv[1], "best")
    sd = {k: v + 1 for k, v in load_file(os.path.join(best, "model.safetensors")).items()}
    meta = {**json.load(open(os.path.join(best, "meta.json"))), "step": 999}
    real, calls = os.replace, []
    def replace(src, dst):
        calls.append(src)
        if len(calls) == 2:  # best -> best.old done, best.tmp -> best not yet
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)
    os.replace = replace
    save_folder(best, sd, meta=meta)
""")


def test_a_kill_between_the_renames_of_best_loses_nothing(finetuned, data, tmp_path):
    out, _ = copy_run(finetuned, tmp_path / "run")
    best = os.path.join(out, "best")
    killed = subprocess.run([sys.executable, "-c", REPLACE_BEST_AND_DIE, out], env=ENV, capture_output=True,
                            text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not os.path.exists(best) and os.path.isdir(best + ".old") and os.path.isdir(best + ".tmp")

    # evaluate repairs the folder and scores the new weights (complete before the first rename)
    results = evaluate("classification", data, out, tmp_path / "eval")
    assert results["checkpoint"] == os.path.join(best, "model.safetensors")
    assert json.load(open(os.path.join(best, "meta.json")))["step"] == 999
    assert not leftovers(out)

    # the same moment again, repaired by the fine-tuning run's start-up (resumed, nothing left to train)
    os.rename(best, best + ".old")
    shutil.copytree(best + ".old", best + ".tmp")
    finetune("classification", data, None, out, *SMALL, "--resume", "auto")
    assert json.load(open(os.path.join(best, "meta.json")))["step"] == 999 and not leftovers(out)


def test_a_full_disk_while_saving_best_keeps_the_previous_weights(finetuned, tmp_path, monkeypatch):
    out, _ = copy_run(finetuned, tmp_path / "run")
    best = os.path.join(out, "best")
    before = {n: open(os.path.join(best, n), "rb").read() for n in os.listdir(best)}
    monkeypatch.setattr("beit3.model.saved.save_file", half_then_enospc)
    with pytest.raises(OutputError, match=r"could not write .*best: No space left on device .*version is kept"):
        save_folder(best, {"w": torch.zeros(1000)}, meta={"step": 3})
    assert {n: open(os.path.join(best, n), "rb").read() for n in os.listdir(best)} == before
    assert not leftovers(out)


# -- bad files and paths --------------------------------------------------------------------------
def half_then_enospc(tensors, path, metadata=None):
    """safetensors' save_file on a disk that fills up halfway through the file."""
    from safetensors.torch import save
    data = save(tensors, metadata=metadata)
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    raise OSError(28, "No space left on device")


def small_checkpoint(path):
    from beit3 import BEiT3, BEiT3Config
    cfg = BEiT3Config.from_preset("tiny", embed_dim=64, num_heads=4, ffn_dim=128, depth=2, vl_layers=1, img_size=32,
                                  patch_size=8, vocab_size=120)
    torch.save({"model": BEiT3(cfg).state_dict()}, path)
    return str(path)


def test_bad_checkpoint_files_get_one_line_with_path_and_size(tmp_path, capsys):
    good = small_checkpoint(tmp_path / "good.pth")
    data = open(good, "rb").read()
    cases = {"empty.pth": (b"", "(0 bytes): empty file"),
             "cut.pth": (data[: len(data) // 3], f"({len(data) // 3:,} bytes): truncated or corrupted"),
             "notes.pth": (b"these are my notes, not weights\n", "(32 bytes): not a torch checkpoint"),
             "cut.safetensors": (b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":", "(13 bytes): not a complete safetensors")}
    for name, (content, expected) in cases.items():
        (tmp_path / name).write_bytes(content)
        out = tmp_path / f"{name}.out.safetensors"
        assert export_main(["--to", "safetensors", str(tmp_path / name), "-o", str(out)]) == 2
        error_line(capsys.readouterr().err, "beit3 export", f"{tmp_path / name} {expected}")
        assert not out.exists()
    (tmp_path / "config.json").write_text('{"embed_dim": 64,')
    assert export_main(["--to", "safetensors", good, "-o", str(tmp_path / "x.safetensors"), "--config",
                        str(tmp_path / "config.json")]) == 2
    error_line(capsys.readouterr().err, "beit3 export", "config.json (17 bytes): not valid JSON")


def test_corrupt_meta_json_is_named(finetuned, data, tmp_path, capsys):
    from beit3.cli.evaluate import main as evaluate_main
    out, _ = copy_run(finetuned, tmp_path / "run")
    meta = os.path.join(out, "best", "meta.json")
    open(meta, "w").write('{"task": "classification", ')
    assert evaluate_main(["--checkpoint", out, "--data", data.world, "--spm", data.spm]) == 2
    error_line(capsys.readouterr().err, "beit3 evaluate", f"{meta} (27 bytes): not valid JSON")


def test_output_paths_are_checked_before_any_work(assets, tmp_path, capsys):
    from beit3.cli.benchmark import main as benchmark_main
    from beit3.cli.pretrain import main as pretrain_main
    good = small_checkpoint(tmp_path / "good.pth")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    (tmp_path / "a_dir").mkdir()
    assert export_main(["--to", "safetensors", good, "-o", str(tmp_path / "a_dir")]) == 2
    error_line(capsys.readouterr().err, "beit3 export", "a_dir (a directory): expected a file name")
    assert export_main(["--to", "timm", good, "-o", str(a_file / "timm")]) == 2
    error_line(capsys.readouterr().err, "beit3 export", "a_file (1 bytes) is not a folder")
    assert export_main(["--to", "safetensors", good, "-o", str(tmp_path / "x.safetensors"), "--img-size", "0"]) == 2
    error_line(capsys.readouterr().err, "beit3 export", "--img-size must be positive, got 0")
    assert not (tmp_path / "x.safetensors").exists()
    spm, tok = assets
    assert pretrain_main(["--output", str(a_file), "--spm", spm, "--tokenizer", tok, "--steps", "1"]) == 2
    error_line(capsys.readouterr().err, "beit3 pretrain", "a_file (1 bytes): exists and is not a folder")
    assert benchmark_main(["--markdown", str(a_file / "bench.md"), "--steps", "1", "--warmup", "0"]) == 2
    captured = capsys.readouterr()
    error_line(captured.err, "beit3 benchmark", "--markdown", "is not a folder")
    assert captured.out == ""  # refused before measuring anything
    assert a_file.read_text() == "x"


def read_only_folder(tmp_path):
    """A folder this process cannot write in: chmod 555, or for root (whom modes do not stop) a
    sysfs folder, where the kernel refuses new files to everyone."""
    if os.geteuid() != 0:
        ro = tmp_path / "read_only"
        ro.mkdir()
        ro.chmod(0o555)
        return str(ro)
    import tempfile
    try:
        tempfile.mkstemp(dir="/sys")
    except OSError:
        return "/sys"
    pytest.skip("running as root and /sys accepts new files here: no folder refuses writes")


def test_a_read_only_output_is_refused_before_any_work(tmp_path, capsys):
    ro = read_only_folder(tmp_path)
    good = small_checkpoint(tmp_path / "good.pth")
    assert export_main(["--to", "safetensors", good, "-o", os.path.join(ro, "x.safetensors")]) == 2
    error_line(capsys.readouterr().err, "beit3 export", f"cannot write in {ro}")


def test_a_full_disk_or_a_kill_during_export_keeps_the_previous_file(tmp_path, capsys, monkeypatch):
    good = small_checkpoint(tmp_path / "good.pth")
    out = tmp_path / "out.safetensors"
    assert export_main(["--to", "safetensors", good, "-o", str(out)]) == 0
    previous = out.read_bytes()
    other = small_checkpoint(tmp_path / "other.pth")  # other random weights

    with monkeypatch.context() as m:
        m.setattr("beit3.weights.export.save_file", half_then_enospc)
        assert export_main(["--to", "safetensors", other, "-o", str(out)]) == 1
    error_line(capsys.readouterr().err, "beit3 export", f"could not write {out}: No space left on device",
               "bytes free there); the previous version is kept")
    assert out.read_bytes() == previous and not leftovers(tmp_path)

    kill = textwrap.dedent(f"""
        import os, signal, sys
        real = os.replace
        def replace(src, dst):  # the temporary is complete: die before it replaces the output
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace = replace
        from beit3.cli.export import main
        main(["--to", "safetensors", {other!r}, "-o", {str(out)!r}])
    """)
    killed = subprocess.run([sys.executable, "-c", kill], env=ENV, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert out.read_bytes() == previous and len(leftovers(tmp_path)) == 1  # what a kill -9 leaves
    assert export_main(["--to", "safetensors", other, "-o", str(out)]) == 0
    assert out.read_bytes() != previous and not leftovers(tmp_path)  # the next export cleaned it up


def test_a_planted_cifar_batch_does_not_run(data, tmp_path, capsys):
    d = tmp_path / "cifar" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    import pickle
    import numpy as np
    rows = np.zeros((2, 3072), dtype=np.uint8)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (d / name).write_bytes(pickle.dumps({"data": rows, "labels": [0, 1]}, protocol=2))
    marker = tmp_path / "pwned_by_cifar"
    (d / "data_batch_3").write_bytes(pickle.dumps({"data": rows, "labels": WritesFileWhenUnpickled(marker)}))
    with pytest.raises(BadFileError, match="data_batch_3 .*refused io.open"):
        CIFARDataset(tmp_path / "cifar")
    assert finetune_main(["--task", "classification", "--dataset", "cifar10", "--preset", "tiny", "--data",
                          str(tmp_path / "cifar"), "--spm", data.spm, "--output", str(tmp_path / "run"), *COMMON]) == 1
    error_line(capsys.readouterr().err, "beit3 finetune", f"{d / 'data_batch_3'} (", "refused io.open")
    assert not marker.exists()


# -- bad samples in fine-tuning ---------------------------------------------------------------------
def index_lines(world, split, n, labels=(0, 1, 2)):
    """``n`` entries of the world's index, of ``labels`` in turn, with absolute image paths."""
    with open(os.path.join(world, f"imagenet.{split}.index.jsonl")) as f:
        items = [json.loads(line) for line in f]
    pools = [[it for it in items if it["label"] == label] for label in labels]
    picked = []
    while len(picked) < n and any(pools):
        picked += [pool.pop(0) for pool in pools if pool][: n - len(picked)]
    return [{**it, "image_path": os.path.join(world, it["image_path"])} for it in picked]


def write_index(root, split, items):
    with open(os.path.join(root, f"imagenet.{split}.index.jsonl"), "w") as f:
        f.writelines(json.dumps(it) + "\n" for it in items)


@pytest.fixture
def broken_images(data, tmp_path):
    """A classification data root: 8 good training images, one missing, one that is text, one
    decompression bomb (15000 x 15000 pixels in a 27 kB PNG); 8 good validation images."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "notes.png").write_text("not a png")
    Image.new("1", (15000, 15000)).save(root / "bomb.png")
    bad = [{"image_path": str(root / n), "label": 0} for n in ("gone.png", "notes.png", "bomb.png")]
    write_index(root, "train", index_lines(data.world, "train", 8) + bad)
    write_index(root, "val", index_lines(data.world, "val", 8))
    return root


def test_unreadable_training_images_are_skipped_named_once_and_counted(broken_images, data, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--task", "classification", "--preset", "tiny", "--data", str(broken_images), "--spm", data.spm,
            "--output", str(run), *COMMON, *SMALL, "--batch-size", "11", "--log-every", "1"]
    assert finetune_main([*args, "--max-bad-fraction", "0.3"]) == 0  # each step sees all 11 items
    out = capsys.readouterr().out
    for name, why in (("gone.png", "does not exist"), ("notes.png", "cannot decode image"),
                      ("bomb.png", "too large to decode safely")):
        named = [line for line in out.splitlines() if name in line]
        assert len(named) == 1 and why in named[0], named
    lines = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [m["skipped_samples"] for m in lines if "loss" in m] == [3, 3]

    assert finetune_main([*args, "--output", str(tmp_path / "run2"), "--max-bad-fraction", "0.1"]) == 1
    error_line(capsys.readouterr().err, "beit3 finetune", "3 of 11 training images cannot be read",
               "--max-bad-fraction 0.1 allows (1)")


def test_bad_index_entries_stop_the_run_before_it_starts(broken_images, data, tmp_path, capsys):
    good = index_lines(data.world, "train", 8)
    args = ["--task", "classification", "--preset", "tiny", "--data", str(broken_images), "--spm", data.spm,
            "--output", str(tmp_path / "run"), *COMMON]
    write_index(broken_images, "train", good[:2] + [{"image_path": good[2]["image_path"]}] + good[3:])
    assert finetune_main(args) == 1
    error_line(capsys.readouterr().err, "beit3 finetune", "1 of 8 train entries cannot be used",
               "imagenet.train.index.jsonl entry 3: no 'label'")
    write_index(broken_images, "train", good)
    classes = 1 + max(it["label"] for it in good)
    write_index(broken_images, "val", index_lines(data.world, "val", 3) + [{**good[0], "label": 99}])
    assert finetune_main(args) == 1
    error_line(capsys.readouterr().err, "beit3 finetune", f"entry 4: label 99 outside 0..{classes - 1}")
    write_index(broken_images, "val", index_lines(data.world, "val", 3) + [{**good[0], "image_path": "gone.png"}])
    assert finetune_main(args) == 1
    error_line(capsys.readouterr().err, "beit3 finetune", "1 of 4 val images do not exist",
               "an evaluation set may lack none")
    assert not os.path.exists(tmp_path / "run" / "run_config.json")
