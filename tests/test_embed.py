"""``beit3 embed`` / ``beit3 search`` and ``beit3.embed_images`` / ``embed_texts`` on the session's tiny
retrieval model (fine-tuned 2 steps): batched vectors equal the predictor's one by one, from a
folder, a text file, a JSON-lines list and webdataset shards (local and ``pipe:``, images and
captions); a killed run resumes without recomputing its finished chunks, and a shard that failed is
read again by the next run; bad images are skipped and counted; 2 ranks write
the matrix of 1; torch and faiss find the same neighbours; the recall of the saved matrices equals
``beit3 evaluate``'s; every bad input is one line before any work.
"""
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import webdataset as wds

import beit3
from beit3.jobs import embed as embed_job
from beit3.inference.embed import load_retrieval
from beit3.cli.embed import main_embed, main_search
from beit3.jobs.embed import EmbedConfig, run
from beit3.inference.search import has_faiss, top_k
from beit3.inference.vectors import read_vectors

from finetune_helpers import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")
BOUND = 1e-5  # batched against one by one; measured up to 1.2e-7 (images), 2.1e-7 (texts): docs/embeddings.md


def val_images(data):
    return sorted(glob.glob(os.path.join(data.world, "images", "val", "*.png")))


def val_captions(data):
    """[(image file name, [its raw captions])] of the retrieval index's val split (Karpathy's JSON)."""
    with open(os.path.join(data.world, "raw", "dataset_coco.json")) as f:
        images = [im for im in json.load(f)["images"] if im["split"] == "val"]
    return [(im["filename"], [s["raw"] for s in im["sentences"]]) for im in images]


def embed(capsys, model, *flags):
    rc = main_embed([str(model), *map(str, flags)])
    err = capsys.readouterr().err
    assert rc == 0, err
    return err


def search(capsys, *argv):
    assert main_search([str(a) for a in argv]) == 0, capsys.readouterr().err
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.fixture(scope="module")
def model(retrieval_run):
    return retrieval_run / "best"


@pytest.fixture(scope="module")
def predictor(model):
    return beit3.load_predictor(str(model))


@pytest.fixture(scope="module")
def saved(model, data, tmp_path_factory):
    """The val images (a folder) and captions (a JSON-lines list) embedded, with their pairs file."""
    out = tmp_path_factory.mktemp("embedded")
    with open(out / "captions.jsonl", "w") as t, open(out / "pairs.jsonl", "w") as p:
        for name, captions in val_captions(data):
            for k, caption in enumerate(captions):
                t.write(json.dumps({"id": f"{name}#{k}", "text": caption}) + "\n")
                p.write(json.dumps({"image": name, "text": f"{name}#{k}"}) + "\n")
    for name, source in (("images.npy", os.path.join(data.world, "images", "val")),
                         ("texts.npy", out / "captions.jsonl")):
        assert main_embed([str(model), "--input", str(source), "--output", str(out / name), "--chunk-size", "10",
                           "--batch-size", "7"]) == 0
    return out


def test_folder_text_file_and_list_equal_the_predictor_one_by_one(saved, predictor, data, tmp_path, capsys):
    images = val_images(data)
    index = read_vectors(str(saved / "images.npy"))
    assert index.ids == [os.path.basename(p) for p in images] and index.matrix.shape == (24, 192)
    one_by_one = torch.cat([predictor.embed_images([p]) for p in images])
    assert (torch.from_numpy(np.array(index.matrix)) - one_by_one).abs().max() <= BOUND
    assert (beit3.embed_images(predictor, images, batch_size=5) - one_by_one).abs().max() <= BOUND
    summary = json.loads((saved / "images.json").read_text())
    assert {k: summary[k] for k in ("dims", "count", "skipped", "chunks", "chunks_computed", "modality")} == \
        {"dims": 192, "count": 24, "skipped": 0, "chunks": 3, "chunks_computed": 3, "modality": "image"}
    assert not os.path.exists(saved / "images.chunks")  # removed once the matrix is written

    captions = [c for _, cs in val_captions(data) for c in cs][:30]
    (tmp_path / "captions.txt").write_text("\n".join(captions[:12]) + "\n\n" + "\n".join(captions[12:]) + "\n")
    embed(capsys, predictor.saved.directory, "--input", tmp_path / "captions.txt", "--output",
          tmp_path / "texts.safetensors", "--dtype", "float16", "--batch-size", "8")
    texts = read_vectors(str(tmp_path / "texts.safetensors"))
    assert texts.ids == [str(n) for n in range(1, 13)] + [str(n) for n in range(14, 32)]  # line numbers
    assert texts.matrix.dtype == np.float16
    one_by_one = torch.cat([predictor.embed_texts([t]) for t in captions])
    assert (torch.from_numpy(texts.matrix.astype(np.float32)) - one_by_one).abs().max() <= 1e-3  # float16
    assert (beit3.embed_texts(str(predictor.saved.directory), captions, batch_size=8) - one_by_one).abs().max() <= BOUND
    listed = read_vectors(str(saved / "texts.npy"))
    assert listed.ids[:2] == [f"{val_captions(data)[0][0]}#0", f"{val_captions(data)[0][0]}#1"]


def write_shard(path, samples):
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)


def test_shards_local_and_piped_give_the_folder_vectors(saved, model, predictor, data, tmp_path, capsys):
    images = val_images(data)
    captions = dict(val_captions(data))
    samples = [{"__key__": os.path.splitext(os.path.basename(p))[0], "png": open(p, "rb").read(),
                "txt": captions[os.path.basename(p)][0]} for p in images]
    samples.insert(5, {"__key__": "broken", "png": b"\x89PNG\r\n\x1a\nnot really"})
    write_shard(tmp_path / "part-000000.tar", samples[:13])
    write_shard(tmp_path / "part-000001.tar", samples[13:])
    folder = read_vectors(str(saved / "images.npy"))
    for spec in (str(tmp_path / "part-{000000..000001}.tar"), f"pipe:cat {tmp_path}/part-{{000000..000001}}.tar"):
        out = tmp_path / "shards.npy"
        err = embed(capsys, model, "--input", spec, "--output", out, "--no-resume")
        got = read_vectors(str(out))
        assert got.ids == [os.path.splitext(i)[0] for i in folder.ids]
        assert np.abs(got.matrix - folder.matrix).max() <= BOUND
        summary = json.loads((tmp_path / "shards.json").read_text())
        assert summary["skipped"] == 1 and summary["skipped_examples"][0]["id"] == "broken"
        assert "cannot decode image" in summary["skipped_examples"][0]["why"] and "1 skipped" in err
    # The captions of the same pairs shards (the broken sample has none).
    embed(capsys, model, "--input", tmp_path / "part-{000000..000001}.tar", "--modality", "text", "--output",
          tmp_path / "captions.npy")
    got = read_vectors(str(tmp_path / "captions.npy"))
    assert got.ids == [os.path.splitext(i)[0] for i in folder.ids]
    one_by_one = torch.cat([predictor.embed_texts([captions[i][0]]) for i in folder.ids])
    assert (torch.from_numpy(np.array(got.matrix)) - one_by_one).abs().max() <= BOUND
    why = json.loads((tmp_path / "captions.json").read_text())["skipped_examples"][0]["why"]
    assert why.startswith("no text in the sample")


def test_a_shard_that_fails_is_read_again_by_the_next_run(saved, model, data, tmp_path, capsys):
    images = val_images(data)
    for n, part in enumerate((images[:10], images[10:20], images[20:])):
        if n != 1:  # the second shard is not there yet: its `cat` fails
            write_shard(tmp_path / f"part-{n:06d}.tar",
                        [{"__key__": os.path.splitext(os.path.basename(p))[0], "png": open(p, "rb").read()} for p in part])
    argv = [str(model), "--input", f"pipe:cat {tmp_path}/part-{{000000..000002}}.tar", "--output",
            str(tmp_path / "v.npy"), "--shard-retries", "1", "--retry-backoff", "0"]
    assert main_embed(argv) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("beit3 embed: error: 1 shard(s) could not be read to their end (first: pipe:cat ")
    assert "part-000001.tar: command exit 1); every other chunk is kept" in err
    assert sorted(os.listdir(tmp_path / "v.chunks")) == ["chunk-000000.npz", "chunk-000002.npz", "plan.json"]
    write_shard(tmp_path / "part-000001.tar",
                [{"__key__": os.path.splitext(os.path.basename(p))[0], "png": open(p, "rb").read()} for p in images[10:20]])
    err = embed(capsys, *argv)
    assert "resuming: 2 of 3 chunks" in err and "embedded 24 images" in err
    got, folder = read_vectors(str(tmp_path / "v.npy")), read_vectors(str(saved / "images.npy"))
    assert got.ids == [os.path.splitext(i)[0] for i in folder.ids]
    assert np.abs(got.matrix - folder.matrix).max() <= BOUND


class Killed(Exception):
    """A kill in the middle of a run (raised where the next chunk would be written)."""


def test_a_killed_run_resumes_without_recomputing_its_chunks(model, data, tmp_path, monkeypatch, capsys):
    cfg = EmbedConfig(model=str(model), input=os.path.join(data.world, "images", "val"),
                      output=str(tmp_path / "v.npy"), chunk_size=5, batch_size=5)
    computed, kills, save = [], [2], embed_job.save_chunk

    def save_then_die(files, index, *rest):
        if kills and len(computed) == kills[0]:
            kills.pop()
            raise Killed  # once, after two chunks were written
        save(files, index, *rest)
        computed.append(index)

    monkeypatch.setattr(embed_job, "save_chunk", save_then_die)
    with pytest.raises(Killed):
        run(cfg)
    assert sorted(os.listdir(tmp_path / "v.chunks")) == ["chunk-000000.npz", "chunk-000001.npz", "plan.json"]
    assert not os.path.exists(tmp_path / "v.npy")
    capsys.readouterr()

    # Another dtype would mix chunks of two settings: refused, nothing removed.
    assert main_embed([cfg.model, "--input", cfg.input, "--output", cfg.output, "--chunk-size", "5",
                       "--dtype", "float16"]) == 2
    err = capsys.readouterr().err
    assert "v.chunks holds the chunks of another run (dtype differ)" in err and err.count("\n") == 1
    assert len(os.listdir(tmp_path / "v.chunks")) == 3

    lines = []
    summary = run(cfg, log=lines.append)
    assert computed == [0, 1, 2, 3, 4] and summary["chunks"] == 5 and summary["chunks_computed"] == 3
    assert any(line.startswith("resuming: 2 of 5 chunks") and "kept, not recomputed" in line for line in lines)
    assert not os.path.exists(tmp_path / "v.chunks")

    # --no-resume starts over: killed again after two chunks, then all five computed.
    computed.clear()
    kills.append(2)
    other = EmbedConfig(**{**vars(cfg), "output": str(tmp_path / "w.npy")})
    with pytest.raises(Killed):
        run(other)
    lines.clear()
    whole = run(EmbedConfig(**{**vars(other), "resume": False}), log=lines.append)
    assert whole["chunks_computed"] == 5 and computed == [0, 1, 0, 1, 2, 3, 4]
    assert any(line.startswith("removed 2 chunks of an earlier run") and "(--no-resume)" in line for line in lines)
    assert np.array_equal(np.load(tmp_path / "v.npy"), np.load(tmp_path / "w.npy"))  # bit for bit


def test_bad_images_are_skipped_and_counted(model, data, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in val_images(data)[:3]:
        shutil.copy(p, folder)
    (folder / "zz_corrupt.png").write_bytes(b"not an image")
    (folder / "aa_cut.png").write_bytes(open(val_images(data)[3], "rb").read()[:200])
    err = embed(capsys, model, "--input", folder, "--output", tmp_path / "out.npy")
    assert "embedded 3 images" in err and "2 skipped (first: aa_cut.png: cannot decode image" in err
    got = read_vectors(str(tmp_path / "out.npy"))
    assert got.ids == sorted(os.path.basename(p) for p in val_images(data)[:3])
    summary = json.loads((tmp_path / "out.json").read_text())
    assert summary["count"] == 3 and summary["skipped"] == 2
    assert [s["id"] for s in summary["skipped_examples"]] == ["aa_cut.png", "zz_corrupt.png"]


def test_bad_inputs_are_one_line_before_any_work(model, data, tmp_path, capsys):
    images = os.path.join(data.world, "images", "val")
    backbone = tmp_path / "backbone"
    beit3.BEiT3(beit3.BEiT3Config.from_preset("tiny", img_size=32)).save_pretrained(str(backbone))
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("")
    (tmp_path / "mixed.jsonl").write_text('{"id": 1, "text": "a"}\n{"id": 2, "image": "x.png"}\n')
    (tmp_path / "twice.jsonl").write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    out = tmp_path / "out.npy"
    cases = [
        ((tmp_path / "missing", "--input", images), "missing (does not exist): not a saved model folder"),
        ((backbone, "--input", images), "holds a backbone (no task head) model; embeddings come from a retrieval"),
        (("beit3_base_patch16_224", "--input", images), "beit3_base_patch16_224 is a backbone checkpoint; embeddings"),
        ((model, "--input", tmp_path / "empty"), "empty: no image files"),
        ((model, "--input", tmp_path / "mixed.jsonl"), "mixed.jsonl line 2 holds an image, line 1 a text"),
        ((model, "--input", tmp_path / "twice.jsonl"), "twice.jsonl line 2: id 'a' is also line 1's"),
        ((model, "--input", tmp_path / "nothing-{0..3}.tar"), "matches no file"),
        ((model, "--input", images, "--output", tmp_path / "file" / "x.npy"), "is not a folder"),
        ((model, "--input", images, "--output", tmp_path / "out.csv"), "expected a .npy or .safetensors file name"),
    ]
    for argv, message in cases:
        argv = [*argv, "--output", out] if "--output" not in argv else argv
        assert main_embed([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("beit3 embed: error: ") and message in err and err.count("\n") == 1, (argv, err)
        assert not os.path.exists(out) and not os.path.exists(tmp_path / "out.chunks")
    assert main_search(["--index", str(tmp_path / "none.npy"), "--text", "a"]) == 2
    assert "none.npy (does not exist): no such embedding matrix" in capsys.readouterr().err


def test_torch_and_faiss_find_the_same_neighbours(saved, model, tmp_path, capsys):
    queries = ["a large red circle", "two blue squares", "a small green triangle on a noisy background"]
    (tmp_path / "q.txt").write_text("\n".join(queries) + "\n")
    got = {b: search(capsys, model, "--index", saved / "images.npy", "--queries", tmp_path / "q.txt",
                     "--top-k", "5", "--backend", b) for b in ("torch", "faiss") if b == "torch" or has_faiss()}
    torch_hits = got["torch"]
    assert [h["query"] for h in torch_hits] == [q for q in queries for _ in range(5)]
    index = read_vectors(str(saved / "images.npy"))
    p = load_retrieval(str(model))
    sims = p.embed_texts(queries) @ torch.from_numpy(np.array(index.matrix)).T
    best = sims.topk(5, dim=1)
    assert [h["id"] for h in torch_hits] == [index.ids[i] for i in best.indices.flatten().tolist()]
    assert [h["rank"] for h in torch_hits[:5]] == [1, 2, 3, 4, 5]
    assert np.allclose([h["score"] for h in torch_hits], best.values.flatten().tolist(), atol=1e-6)
    # An image query, from a JSON-lines file, with the model the index's summary names: itself first.
    first = os.path.join(json.loads((saved / "images.json").read_text())["input"], index.ids[0])
    (tmp_path / "q.jsonl").write_text(json.dumps({"id": "q1", "image": first}) + "\n")
    hits = search(capsys, "--index", saved / "images.npy", "--queries", tmp_path / "q.jsonl", "--top-k", "2")
    assert [(h["query"], h["rank"], h["id"]) for h in hits] == [("q1", 1, index.ids[0]), ("q1", 2, hits[1]["id"])]
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-6) and hits[1]["score"] < 0.9999
    # The torch backend merges blocks of the matrix: any block size gives the whole matrix's top-k.
    rows = torch.from_numpy(np.random.default_rng(0).standard_normal((1000, 16)).astype(np.float32))
    q = torch.randn(4, 16)
    whole = top_k(rows.numpy(), q, 7, "torch", block=10 ** 6)
    assert torch.equal(top_k(rows.numpy(), q, 7, "torch", block=37)[1], whole[1])
    if "faiss" not in got:
        pytest.skip("faiss is not installed (pip install faiss-cpu): only the torch backend was checked")
    assert [h["id"] for h in got["faiss"]] == [h["id"] for h in torch_hits]
    assert np.allclose([h["score"] for h in got["faiss"]], [h["score"] for h in torch_hits], atol=1e-5)
    assert torch.equal(top_k(rows.numpy(), q, 7, "faiss")[1], whole[1])


def test_recall_of_the_saved_matrices_equals_evaluate(saved, retrieval_run, data, tmp_path, capsys):
    [got] = search(capsys, "--eval", saved / "pairs.jsonl", "--images", saved / "images.npy",
                   "--texts", saved / "texts.npy")
    results = evaluate("retrieval", data, retrieval_run, tmp_path / "eval")
    keys = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)] + ["mean_recall", "images", "texts"]
    assert {k: got[k] for k in keys} == {k: results[k] for k in keys}
    assert (got["images"], got["texts"]) == (24, 120)


@pytest.mark.filterwarnings("ignore:beit3.text_embed.weight has 402 rows")  # the demo's vocabulary
def test_the_official_checkpoint_format_embeds_the_same(model, data, tmp_path, capsys):
    """unilm/beit3's format (released layout, ``beit3.`` prefix, heads by their official names) gives
    the saved folder's vectors. A random released-layout model: the official format has no VL-FFN."""
    from beit3.cli.export import main as export_main
    from beit3.model.heads import RetrievalModel
    cfg = beit3.BEiT3Config.from_preset("tiny", layout="released", img_size=32, vocab_size=data_vocab(model))
    RetrievalModel(cfg).save_pretrained(str(tmp_path / "saved"), tokenizer=str(model / "tokenizer.model"))
    assert export_main(["--to", "official", str(tmp_path / "saved"), "-o", str(tmp_path / "ret.pth"),
                        "--keep-heads"]) == 0
    capsys.readouterr()
    images = val_images(data)[:4]
    saved = beit3.load_predictor(str(tmp_path / "saved"))
    official = load_retrieval(str(tmp_path / "ret.pth"), spm=str(model / "tokenizer.model"))
    assert official.inference["max_text_len"] == 64 and official.transform is not None
    assert (beit3.embed_images(official, images) - saved.embed_images(images)).abs().max() <= BOUND
    assert (beit3.embed_texts(official, ["a red circle"]) - saved.embed_texts(["a red circle"])).abs().max() <= BOUND
    folder = os.path.dirname(images[0])
    assert main_embed([str(tmp_path / "ret.pth"), "--input", folder, "--output", str(tmp_path / "x.npy")]) == 2
    assert "ret.pth is a checkpoint file, which carries no tokenizer: give its SentencePiece" in capsys.readouterr().err
    assert export_main(["--to", "official", str(tmp_path / "saved"), "-o", str(tmp_path / "bare.pth")]) == 0
    capsys.readouterr()
    assert main_embed([str(tmp_path / "bare.pth"), "--spm", str(model / "tokenizer.model"), "--input", folder,
                       "--output", str(tmp_path / "x.npy")]) == 2
    assert "bare.pth" in (err := capsys.readouterr().err) and "has no retrieval head (vision_head.weight" in err


def data_vocab(model):
    return json.loads((model / "config.json").read_text())["model"]["vocab_size"]


@pytest.mark.slow
def test_two_ranks_write_the_matrix_of_one(model, data, tmp_path):
    """Both through torchrun, so that both start alike: this test process, after the session's
    DeepSpeed fine-tunings, computes vectors 2e-8 away from a fresh process's."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    for ranks in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               "-m", "beit3.cli", "embed", str(model), "--input", os.path.join(data.world, "images", "val"),
               "--output", str(tmp_path / f"{ranks}.npy"), "--chunk-size", "5", "--batch-size", "4"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = read_vectors(str(tmp_path / "1.npy")), read_vectors(str(tmp_path / "2.npy"))
    assert two.ids == one.ids and len(one.ids) == 24
    assert np.array_equal(np.asarray(two.matrix), np.asarray(one.matrix))
    assert json.loads((tmp_path / "2.json").read_text())["ranks"] == 2
