"""ADE20K as distributed: layout, pairing, labels, bad pairs; mmseg's training and test transforms."""
import numpy as np
import pytest
import torch
from PIL import Image

from beit3.data.ade20k import ADE20K_CLASSES, ADE20KDataset, ImageLoadError, LayoutError, annotation_image, pair_files, read_class_names, reduce_zero_label
from beit3.data.bad_images import SkipUnreadable
from beit3.data.index_check import IndexProblemError, check_dataset
from beit3.data.seg_transforms import SegEvalTransform, SegTrainTransform, crop_box, photometric_distortion, rescale_size
from beit3.data.transforms import eval_transform
from beit3.cli.finetune import main as finetune_main

COLOURS = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]], dtype=np.uint8)  # classes 1, 2, 3


def write_pair(root, split, stem, size=(40, 30), seed=0, image=True, annotation=True):
    """An image whose colour says its class: stored id k (1..3) painted COLOURS[k - 1], 0 grey."""
    rng = np.random.default_rng(seed)
    w, h = size
    ids = np.zeros((h, w), dtype=np.uint8)
    ids[: h // 2, : w // 2], ids[: h // 2, w // 2:], ids[h // 2:, : w // 3] = 1, 2, 3
    ids[rng.random((h, w)) < 0.05] = 0
    pixels = np.where(ids[..., None] > 0, COLOURS[np.maximum(ids, 1) - 1], 128).astype(np.uint8)
    folder = {"train": "training", "val": "validation"}[split]
    if image:
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / "images" / folder / f"{stem}.jpg", quality=100)
    if annotation:
        (root / "annotations" / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(ids).save(root / "annotations" / folder / f"{stem}.png")
    return ids


@pytest.fixture
def ade(tmp_path):
    root = tmp_path / "data" / "ADEChallengeData2016"
    for i in range(4):
        write_pair(root, "train", f"ADE_train_{i:08d}", size=(40 + 4 * i, 30 + 2 * i), seed=i)
    write_pair(root, "val", "ADE_val_00000001", size=(50, 34))
    (root / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n1\t0.2\t4\t1\tred;crimson\n"
                                            "2\t0.2\t4\t1\tgreen, lime\n3\t0.1\t4\t1\tblue\n")
    return root


def test_layout_pairs_and_classes(ade):
    for data in (ade, ade.parent):  # the ADEChallengeData2016 folder or the one holding it
        ds = ADE20KDataset(data, "train")
        assert ds.root == ade and len(ds) == 4 and ds.classes == ["red", "green", "blue"]
    item = ADE20KDataset(ade, "val")[0]
    stored = np.asarray(Image.open(ade / "annotations/validation/ADE_val_00000001.png"))
    assert item["image"].shape == (3, 34, 50) and item["label"].shape == (34, 50)
    assert torch.equal(item["label"], torch.from_numpy(reduce_zero_label(stored).astype(np.int64)))
    assert read_class_names(ade.parent) == list(ADE20K_CLASSES) and len(ADE20K_CLASSES) == 150  # no objectInfo150.txt


def test_zero_is_ignored_and_ids_shift_down():
    stored = np.array([[0, 1, 2], [150, 0, 149]], dtype=np.uint8)
    assert reduce_zero_label(stored).tolist() == [[255, 0, 1], [149, 255, 148]]


def test_wrong_layout_is_one_line(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    with pytest.raises(LayoutError, match="expected ADE20K's layout ADEChallengeData2016/images/"):
        ADE20KDataset(tmp_path, "train")
    rc = finetune_main(["--task", "segmentation", "--data", str(tmp_path), "--output", str(tmp_path / "run"),
                        "--no-tensorboard"])
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # after the progress bar's first draw
    assert rc != 0 and line.startswith("beit3 finetune: error: ") and err.count("error") == 1
    assert "annotations/{training,validation}/*.png" in line and "Traceback" not in err
    with pytest.raises(ValueError, match="no annotated split 'test'"):
        pair_files(tmp_path, "test")


def test_unpaired_files_are_counted_and_skipped_in_training(ade):
    write_pair(ade, "train", "no_annotation", annotation=False)
    write_pair(ade, "train", "no_image", image=False)
    ds = ADE20KDataset(ade, "train", SegTrainTransform(32, scale=(64, 32), photometric=False))
    assert len(ds) == 6
    with pytest.raises(IndexProblemError, match="2 of 12 train images do not exist"):
        check_dataset(ds, "train", max_missing=0.1)
    logged = []
    files, missing = check_dataset(ds, "train", max_missing=0.2, log=logged.append)
    assert files == 12 and sorted(p.rsplit("/", 1)[-1] for p in missing) == ["no_annotation.png", "no_image.jpg"]
    assert len(logged) == 2
    names = [p[0].stem for p in ds.pairs]
    skipping = SkipUnreadable(ds)
    item = skipping[names.index("no_annotation")]  # replaced by the next readable pair
    assert item["image"].shape == (3, 32, 32) and "does not exist" in item["skipped_images"]


@pytest.mark.parametrize("bad,problem", [("rgb", "is a RGB image"), ("size", "is 10x10 but its image"),
                                         ("id", "holds class id 9")])
def test_bad_annotations_raise_naming_the_file(ade, bad, problem):
    path = ade / "annotations/training/ADE_train_00000000.png"
    if bad == "rgb":
        Image.new("RGB", (40, 30)).save(path)
    elif bad == "size":
        Image.new("L", (10, 10)).save(path)
    else:
        Image.fromarray(np.full((30, 40), 9, dtype=np.uint8)).save(path)
    with pytest.raises(ImageLoadError, match=problem) as e:
        ADE20KDataset(ade, "train")[0]
    assert e.value.path == str(path)


def test_rescale_follows_mmcv():
    assert rescale_size((683, 512), (2048, 512)) == (683, 512)
    assert rescale_size((1366, 1024), (2048, 512)) == (683, 512)  # short side bound
    assert rescale_size((300, 1500), (2048, 512)) == (410, 2048)  # long side bound
    pre = {"size": 512, "resize": "rescale", "scale": [2048, 512], "crop_pct": 1.0, "interpolation": "bilinear",
           "mean": [0.5] * 3, "std": [0.5] * 3}
    assert eval_transform(pre)(Image.new("RGB", (1366, 1024))).shape == (3, 512, 683)


def test_crop_retries_as_mmseg():
    """cat_max_ratio: a crop is redrawn (10 times at most) while it holds fewer than two scored
    classes or one covers that share of it; the first acceptable draw is kept."""
    def draws(label, ratio, seed=3):
        torch.manual_seed(seed)
        box = crop_box(label, 8, ratio)
        return box, torch.randint(1000, ()).item()  # where the generator stands afterwards

    one_class = np.zeros((32, 32), dtype=np.uint8)
    checker = (np.indices((32, 32)).sum(0) % 2).astype(np.uint8)  # two classes, 50 / 50 everywhere
    free, after_free = draws(one_class, 1.0)
    assert draws(checker, 0.75) == (free, after_free)  # accepted at once
    torch.manual_seed(3)
    boxes = [crop_box(one_class, 8, 1.0) for _ in range(11)]
    assert draws(one_class, 0.75)[0] == boxes[-1]  # ten redraws, then the last is kept
    ignored = np.full((32, 32), 255, dtype=np.uint8)
    ignored[:, :2] = 1
    assert draws(ignored, 0.75)[0] == boxes[-1]  # one scored class: never acceptable


def test_train_transform_keeps_image_and_targets_aligned(ade):
    torch.manual_seed(0)
    ds = ADE20KDataset(ade, "train", SegTrainTransform(32, scale=(96, 48), ratio_range=(0.5, 2.0), hflip=0.5,
                                                       photometric=False, mean=(0, 0, 0), std=(1, 1, 1)))
    seen_pad = False
    for k in range(12):
        item = ds[k % 4]
        image, label = item["image"], item["label"]
        assert image.shape == (3, 32, 32) and label.shape == (32, 32) and label.dtype == torch.long
        pad = label == 255
        seen_pad |= bool(pad[-1].all() and (image[:, -1] == 0).all())  # padded with 0 and 255
        # away from class borders each pixel has its class's colour (crop, flip and resize agree)
        lab = label.numpy()
        inner = np.zeros_like(lab, dtype=bool)
        inner[1:-1, 1:-1] = np.all([lab[1:-1, 1:-1] == np.roll(np.roll(lab, dy, 0), dx, 1)[1:-1, 1:-1]
                                    for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
        inner &= lab < 3
        rgb = (image.permute(1, 2, 0).numpy() * 255)[inner]  # (n, 3)
        nearest = np.abs(rgb[:, None] - COLOURS[None].astype(np.float32)).sum(-1).argmin(1)
        assert (nearest == lab[inner]).mean() > 0.97  # a crop or flip of one and not the other: ~1/3
    assert seen_pad  # some draws were smaller than the crop


def test_photometric_distortion_changes_tone_not_greys():
    grey = np.full((8, 8, 3), 100, dtype=np.uint8)
    colour = np.zeros((8, 8, 3), dtype=np.uint8)
    colour[..., 0] = 200
    changed = 0
    for seed in range(20):
        torch.manual_seed(seed)
        out = photometric_distortion(grey)
        assert out.dtype == np.uint8 and out.shape == grey.shape
        assert (out == out[..., :1]).all()  # saturation and hue leave a grey image grey
        torch.manual_seed(seed)
        changed += not np.array_equal(photometric_distortion(colour), colour)
    assert changed >= 15  # each of four changes is applied with probability 0.5


def test_eval_transform_and_mask_png(tmp_path):
    image, target = SegEvalTransform((256, 64))(Image.new("RGB", (120, 80)), np.zeros((80, 120), dtype=np.uint8))
    assert image.shape == (3, 64, 96) and target.shape == (80, 120)  # targets stay at the annotation's size
    classes = np.array([[0, 1], [17, 2]])
    annotation_image(classes).save(tmp_path / "m.png")
    back = Image.open(tmp_path / "m.png")
    assert back.mode == "P" and np.asarray(back).tolist() == [[1, 2], [18, 3]]
