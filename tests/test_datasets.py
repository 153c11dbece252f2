"""The training data layer: dataset loaders, errors, glyphs and augmentation (no torch needed)."""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from dmf_deploy.config import ModelConfig, PreprocessConfig
from dmf_deploy.preprocess import normalize, preprocess_frame, resize_frame
from dmf_deploy.train.augment import AugmentConfig, make_example
from dmf_deploy.train.datasets import (
    OMNIGLOT_DEFAULT_SPLIT,
    DatasetError,
    load_omniglot,
    open_dataset,
)
from dmf_deploy.train.glyphs import GlyphSet, glyph_dataset

REPO = Path(__file__).resolve().parents[1]
OMNIGLOT_DIR = Path(os.environ.get("DMF_OMNIGLOT_DIR", REPO.parent / "shared" / "data" / "omniglot"))
SMALL_ZIPS = ("images_background_small1.zip", "images_background_small2.zip")

needs_omniglot = pytest.mark.skipif(
    not all((OMNIGLOT_DIR / z).is_file() for z in SMALL_ZIPS),
    reason=f"Omniglot small background zips not found in {OMNIGLOT_DIR} (set DMF_OMNIGLOT_DIR)",
)


@pytest.fixture(scope="module")
def omniglot() -> dict[str, object]:
    return {s: open_dataset("omniglot", OMNIGLOT_DIR, s) for s in ("train", "val", "test")}


# ------------------------------------------------------------------------------------- Omniglot


@needs_omniglot
def test_omniglot_loads_real_zips(omniglot):
    train = omniglot["train"]
    assert train.num_classes == 152 and len(train) == 152 * 20
    assert set(train.counts.tolist()) == {20}
    image = train.load(0)
    assert image.shape == (105, 105, 3) and image.dtype == np.uint8
    assert np.array_equal(image[:, :, 0], image[:, :, 2])  # grey expanded to BGR
    ink = (image[:, :, 0] < 128).mean()
    assert 0.01 < ink < 0.5  # black strokes on a white page
    assert train.class_names[0] == "Balinese/character01"
    assert train.flips_preserve_class is False
    # picklable, so spawned DataLoader workers can receive it
    assert np.array_equal(pickle.loads(pickle.dumps(train)).load(77), train.load(77))


@needs_omniglot
def test_omniglot_duplicates_are_identical_and_dropped(omniglot):
    # The finding behind the dedup rule: Greek and Latin are byte-identical in both small zips.
    def digests(name: str) -> dict[str, str]:
        with zipfile.ZipFile(OMNIGLOT_DIR / name) as zf:
            return {
                n.split("/", 1)[1]: hashlib.sha256(zf.read(n)).hexdigest()
                for n in zf.namelist()
                if n.endswith(".png")
            }

    d1, d2 = digests(SMALL_ZIPS[0]), digests(SMALL_ZIPS[1])
    shared = set(d1) & set(d2)
    assert {p.split("/")[0] for p in shared} == {"Greek", "Latin"} and len(shared) == 1000
    assert all(d1[p] == d2[p] for p in shared)

    names = [n for split in omniglot.values() for n in split.class_names]
    assert len(names) == len(set(names)) == 242  # 136 + 156 - 24 Greek - 26 Latin
    val = omniglot["val"]
    assert val.info["duplicate_characters_dropped"] == 50
    assert val.num_classes == 24 and len(val) == 480  # Greek once, not twice
    assert val.info["sources"] == list(SMALL_ZIPS)


@needs_omniglot
def test_omniglot_alphabet_splits_are_disjoint(omniglot):
    alphabets = {s: set(d.class_groups) for s, d in omniglot.items()}
    assert alphabets == {s: set(a) for s, a in OMNIGLOT_DEFAULT_SPLIT.items()}
    assert not alphabets["train"] & alphabets["val"]
    assert not alphabets["train"] & alphabets["test"]
    assert not alphabets["val"] & alphabets["test"]
    # every class name starts with its alphabet, and the group is exposed per class
    for d in omniglot.values():
        assert all(n.split("/")[0] == g for n, g in zip(d.class_names, d.class_groups, strict=True))
    assert {s: d.num_classes for s, d in omniglot.items()} == {"train": 152, "val": 24, "test": 66}


@needs_omniglot
def test_omniglot_alphabet_override_and_errors():
    split = {"train": ["Korean"], "val": ["Latin", "Greek"], "test": []}
    val = load_omniglot(OMNIGLOT_DIR, "val", alphabet_split=split)
    assert set(val.class_groups) == {"Greek", "Latin"} and val.num_classes == 50
    with pytest.raises(DatasetError, match=r"split 'test' is empty"):
        load_omniglot(OMNIGLOT_DIR, "test", alphabet_split=split)
    with pytest.raises(DatasetError, match=r"'Klingon'.*not in the data"):
        load_omniglot(OMNIGLOT_DIR, "train", alphabet_split={"train": ["Klingon"]})
    with pytest.raises(DatasetError, match=r"'Greek' is in both 'train' and 'val'"):
        load_omniglot(OMNIGLOT_DIR, "train", alphabet_split={"train": ["Greek"], "val": ["Greek"]})


@needs_omniglot
def test_omniglot_rotations_are_new_classes(omniglot):
    val = omniglot["val"]
    rotated = load_omniglot(OMNIGLOT_DIR, "val", rotations=True)
    assert rotated.num_classes == 4 * val.num_classes and len(rotated) == 4 * len(val)
    assert len(set(rotated.class_names)) == rotated.num_classes
    name = val.class_names[3]
    base = val.load(int(val.indices_by_class[3][0]))
    for k, suffix in enumerate(("", "/rot90", "/rot180", "/rot270")):
        cls = rotated.class_names.index(name + suffix)
        assert rotated.class_groups[cls] == "Greek"
        got = rotated.load(int(rotated.indices_by_class[cls][0]))
        assert np.array_equal(got, np.rot90(base, k))
    assert load_omniglot(OMNIGLOT_DIR, "val", rotations=(0, 180)).num_classes == 48


@needs_omniglot
def test_omniglot_reads_extracted_folder(tmp_path):
    with zipfile.ZipFile(OMNIGLOT_DIR / SMALL_ZIPS[1]) as zf:
        members = [n for n in zf.namelist() if "/Tagalog/character0" in n]
        zf.extractall(tmp_path, members)
    data = load_omniglot(tmp_path, "train")
    assert data.num_classes == 9 and set(data.counts.tolist()) == {20}
    assert data.load(5).shape == (105, 105, 3)


def test_omniglot_wrong_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=rf"{missing}.*does not exist.*images_background\*\.zip"):
        open_dataset("omniglot", missing, "train")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"no Omniglot data in .*found notes\.txt"):
        open_dataset("omniglot", tmp_path, "train")


# ----------------------------------------------------------------------------- Folder and pickle


def _write_folder(root: Path) -> None:
    colours = {"blue": (255, 0, 0), "green": (0, 255, 0), "red": (0, 0, 255)}
    for split, per_class in (("train", 3), ("val", 2)):
        for name, bgr in colours.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                ext = (".png", ".jpg", ".JPEG")[i % 3]
                cv2.imwrite(str(folder / f"{i:02d}{ext}"), np.full((30 + i, 40, 3), bgr, np.uint8))
            (folder / "readme.txt").write_text("not an image")
    (root / "test").mkdir()


def test_folder_dataset(tmp_path):
    _write_folder(tmp_path)
    train = open_dataset("folder", tmp_path, "train")
    assert train.class_names == ["blue", "green", "red"]
    assert train.counts.tolist() == [3, 3, 3]
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert train.flips_preserve_class
    for cls, channel in ((0, 0), (1, 1), (2, 2)):  # loads are BGR
        for index in train.indices_by_class[cls]:
            image = train.load(int(index))
            assert image.dtype == np.uint8 and image.ndim == 3
            assert image[..., channel].min() > 240 and np.delete(image, channel, axis=2).max() < 15
    assert train.load(2).shape == (32, 40, 3)  # the .JPEG file, read at its own size
    assert np.array_equal(pickle.loads(pickle.dumps(train)).load(4), train.load(4))
    tiered = open_dataset("tiered", tmp_path, "val")
    assert tiered.num_classes == 3 and len(tiered) == 6


def test_folder_errors(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(DatasetError, match=rf"{missing} does not exist.*root/\{{train,val,test\}}"):
        open_dataset("folder", missing, "train")
    _write_folder(tmp_path)
    with pytest.raises(DatasetError, match=r"split 'test' at .*test is empty"):
        open_dataset("folder", tmp_path, "test")
    (tmp_path / "train" / "yellow").mkdir()
    cv2.imwrite(str(tmp_path / "train" / "yellow" / "only.png"), np.zeros((8, 8, 3), np.uint8))
    train = open_dataset("folder", tmp_path, "train")
    train.require_per_class(1)
    with pytest.raises(DatasetError, match=r"class 'yellow' has 1 images but 3 are needed"):
        train.require_per_class(3)
    with pytest.raises(DatasetError, match=r"split 'valid'"):
        open_dataset("folder", tmp_path, "valid")
    with pytest.raises(DatasetError, match=r"unknown dataset kind 'cifar'.*omniglot"):
        open_dataset("cifar", tmp_path, "train")


def test_mini_pickle(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(12, 84, 84, 3), dtype=np.uint8)
    labels = [70, 64, 70, 64, 66, 66, 70, 64, 66, 70, 64, 66]
    payload = {"data": data, "labels": labels, "catname2label": {"n01": 64, "n02": 66, "n03": 70}}
    with (tmp_path / "miniImageNet_category_split_val.pickle").open("wb") as f:
        pickle.dump(payload, f, protocol=2)
    val = open_dataset("mini-pickle", tmp_path, "val")
    assert val.class_names == ["n01", "n02", "n03"]
    assert val.labels.tolist() == [2, 0, 2, 0, 1, 1, 2, 0, 1, 2, 0, 1]
    assert val.info["original_labels"] == [64, 66, 70]
    image = val.load(4)
    assert image.flags.c_contiguous and image.shape == (84, 84, 3)
    assert np.array_equal(image, data[4][:, :, ::-1])  # RGB in the file, BGR out
    assert np.array_equal(pickle.loads(pickle.dumps(val)).load(4), image)
    with pytest.raises(DatasetError, match=r"split_train_phase_train\.pickle not found; expected"):
        open_dataset("mini-pickle", tmp_path, "train")
    with pytest.raises(DatasetError, match=r"class 'n01' has 4 images but 5 are needed"):
        val.require_per_class(5)


# ----------------------------------------------------------------------------------------- Glyphs


def _nn_accuracy(glyphs: GlyphSet, n: int, queries: int) -> float:
    def feature(image: np.ndarray) -> np.ndarray:
        grey = cv2.GaussianBlur(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), (0, 0), 3).astype(np.float32)
        v = grey.ravel() - grey.mean()
        return v / np.linalg.norm(v)

    support = np.stack([feature(glyphs.render(c, 0)) for c in range(n)])
    hits = [
        np.argmax(support @ feature(glyphs.render(c, q))) == c
        for c in range(n)
        for q in range(1, queries + 1)
    ]
    return float(np.mean(hits))


def test_glyph_classes_are_distinct_and_deterministic():
    glyphs = GlyphSet(20, seed=7)
    # 1-shot 20-way nearest neighbour on blurred pixels: chance is 5%.
    assert _nn_accuracy(glyphs, 20, 4) > 0.45
    again = GlyphSet(20, seed=7)
    for c in (0, 19):
        assert np.array_equal(glyphs.render(c, 3), again.render(c, 3))
    assert not np.array_equal(glyphs.render(0, 1), glyphs.render(0, 2))  # instances jitter
    assert not np.array_equal(GlyphSet(1, seed=8).render(0, 0), glyphs.render(0, 0))
    image = glyphs.render(4, 2)
    assert image.shape == (84, 84, 3) and image.dtype == np.uint8
    assert 0.02 < (image[..., 0] < 128).mean() < 0.5
    # Colour is cosmetic: the same seed keeps the same shapes.
    coloured = GlyphSet(20, seed=7, ink=None).render(4, 2)
    assert np.array_equal(coloured.min(axis=2) < 250, image.min(axis=2) < 250)


def test_glyph_dataset_and_splits():
    data = glyph_dataset(5, 4, seed=1, image_size=32)
    assert len(data) == 20 and data.counts.tolist() == [4] * 5 and not data.flips_preserve_class
    assert np.array_equal(data.load(6), GlyphSet(5, 1, 32).render(1, 2))
    assert np.array_equal(pickle.loads(pickle.dumps(data)).load(6), data.load(6))
    train = open_dataset("glyphs", None, "train", per_class=3)
    test = open_dataset("glyphs", None, "test", per_class=3)
    assert (train.num_classes, test.num_classes) == (64, 20)
    assert not np.array_equal(train.load(0), test.load(0))  # splits draw different classes
    assert np.array_equal(open_dataset("glyphs", None, "test", per_class=3).load(7), test.load(7))


# ------------------------------------------------------------------------------------ Augmentation


def test_make_example_eval_is_the_shared_preprocessing():
    pre = PreprocessConfig(image_size=40)
    image = GlyphSet(3, 0, image_size=60, ink=None).render(1, 0)
    assert np.array_equal(make_example(image, pre, None, train=False), preprocess_frame(image, pre))


def test_make_example_train_is_seeded_and_respects_flips():
    pre = PreprocessConfig(image_size=40)
    image = np.zeros((50, 70, 3), np.uint8)
    image[:, :10] = 255  # a bright left edge shows whether the image was mirrored
    cfg = AugmentConfig.for_dataset(glyph_dataset(2, 1))
    assert cfg.hflip is False
    a = make_example(image, pre, np.random.default_rng(3), train=True, augment=cfg)
    b = make_example(image, pre, np.random.default_rng(3), train=True, augment=cfg)
    assert a.shape == (3, 40, 40) and a.dtype == np.float32 and np.array_equal(a, b)
    plain = cfg.without("crop", "color", "erase")
    flip = AugmentConfig(hflip=True).without("crop", "color", "erase")
    mirrored = 0
    for seed in range(20):
        assert np.array_equal(
            make_example(image, pre, np.random.default_rng(seed), True, plain), preprocess_frame(image, pre)
        )
        out = make_example(image, pre, np.random.default_rng(seed), True, flip)
        mirrored += bool(out[0, :, -1].mean() > out[0, :, 0].mean())
    assert 3 < mirrored < 17
    with pytest.raises(ValueError, match="crop"):
        AugmentConfig(crop="zoom")


def test_evaluation_crop_resizes_then_keeps_the_centre_and_training_crops_skip_it():
    """tieredImageNet's official test transform, Resize((92, 92)) then CenterCrop((84, 84)): on an
    84x84 image, cv2's 92x92 resize and its central 84x84 square (4-pixel margins)."""
    image = np.random.default_rng(0).integers(0, 256, (84, 84, 3), dtype=np.uint8)
    zoom = PreprocessConfig(image_size=84, crop_from=92)
    expected = cv2.resize(image, (92, 92), interpolation=cv2.INTER_LINEAR)[4:88, 4:88]
    assert np.array_equal(resize_frame(image, zoom), expected)
    assert np.array_equal(make_example(image, zoom, None, train=False), normalize(expected, zoom))
    # "center-crop" (shorter side first) cuts the same margin from the shorter side's square
    wide = np.random.default_rng(1).integers(0, 256, (84, 168, 3), dtype=np.uint8)
    cropped = resize_frame(wide, PreprocessConfig(image_size=84, resize="center-crop", crop_from=92))
    assert np.array_equal(cropped, cv2.resize(wide, (184, 92))[4:88, 50:134])
    # Training crops resize straight to 84, as the official RandomResizedCrop / RandomCrop do.
    plain = AugmentConfig().without("crop", "hflip", "color", "erase")
    trained = make_example(image, zoom, np.random.default_rng(0), True, plain)
    assert np.array_equal(trained, preprocess_frame(image, PreprocessConfig(image_size=84)))
    resized = AugmentConfig(crop="resized").without("hflip", "color", "erase")
    a = make_example(image, zoom, np.random.default_rng(5), True, resized)
    b = make_example(image, PreprocessConfig(image_size=84), np.random.default_rng(5), True, resized)
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="crop_from"):
        PreprocessConfig(image_size=84, crop_from=80)


def test_evaluation_crop_travels_in_the_model_config_and_is_absent_when_unset():
    with_crop = ModelConfig(preprocess=PreprocessConfig(image_size=84, crop_from=92))
    assert with_crop.to_dict()["preprocess"]["crop_from"] == 92
    assert ModelConfig.from_dict(with_crop.to_dict()) == with_crop
    # without one, the dict (manifests, model fingerprints) is what it was before the field existed
    plain = ModelConfig().to_dict()
    assert "crop_from" not in plain["preprocess"] and ModelConfig.from_dict(plain) == ModelConfig()


def test_augmentations_change_the_image():
    pre = PreprocessConfig(image_size=32)
    image = GlyphSet(2, 0, image_size=48, ink=None).render(0, 0)
    base = preprocess_frame(image, pre)
    for step in ("crop", "color", "erase"):
        others = [s for s in ("crop", "hflip", "color", "erase") if s != step]
        cfg = AugmentConfig(erase_prob=1.0, crop="resized").without(*others)
        outs = [make_example(image, pre, np.random.default_rng(s), True, cfg) for s in range(4)]
        assert all(o.shape == base.shape for o in outs)
        assert any(not np.allclose(o, base) for o in outs), step
