"""Pretraining shards with every kind of bad sample, for the loader and fault tests."""
import io
import tarfile

import numpy as np
import webdataset as wds
from PIL import Image

# What write_bad_shards puts in, per epoch: 4 bad samples in 3 shards.
BAD_PER_EPOCH = {"images-000001.tar": 1, "images-000002.tar": 1, "pairs-000000.tar": 2}


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_tar(path, samples):
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)


def write_bad_shards(d):
    """images: a good shard, one with a corrupt image, one truncated in its third sample; pairs: an
    empty and a non-UTF-8 caption; texts: good. Usable per epoch: 9 images, 6 pairs, 6 texts."""
    d.mkdir(parents=True, exist_ok=True)
    write_tar(d / "images-000000.tar", [{"__key__": f"a{i}", "png": png(i)} for i in range(4)])
    corrupt = b"\x89PNG\r\n\x1a\nrubbish"  # a PNG signature, then garbage
    write_tar(d / "images-000001.tar", [{"__key__": f"b{i}", "png": corrupt if i == 2 else png(10 + i)}
                                        for i in range(4)])
    write_tar(d / "images-000002.tar", [{"__key__": f"c{i}", "png": png(20 + i)} for i in range(4)])
    with tarfile.open(d / "images-000002.tar") as tf:
        cut = tf.getmember("c2.png").offset_data + 10
    data = (d / "images-000002.tar").read_bytes()
    (d / "images-000002.tar").write_bytes(data[:cut])
    captions = ["one circle", "", "two squares", "\xff", "a red triangle"]
    write_tar(d / "pairs-000000.tar", [{"__key__": f"p{i}", "png": png(30 + i),
                                        "txt": c.encode("latin-1") if c == "\xff" else c}
                                       for i, c in enumerate(captions)])
    write_tar(d / "pairs-000001.tar", [{"__key__": f"q{i}", "png": png(40 + i), "txt": "a blue square"}
                                       for i in range(3)])
    for n in range(2):
        write_tar(d / f"texts-00000{n}.tar", [{"__key__": f"t{i}", "txt": f"text {n} {i}"} for i in range(3)])
    return d
