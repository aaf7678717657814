"""Tests of fer_core.importer through `python -m study.prepare`, on tiny images drawn in tmp_path."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fer_core import dataset_spec, importer
from fer_core.data import image_id, load_dataset
from study.prepare import main

SIZE = 12
FER4 = Path(__file__).parents[1] / ".." / "shared" / "data" / "fer4"


def draw(path: Path, seed: int, fmt: str = "PNG", size: int = SIZE) -> np.ndarray:
    """Write a random grayscale image (format by ``fmt``, not by the extension); return its pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="L").save(path, format=fmt)
    with Image.open(path) as img:
        return np.asarray(img.convert("L"))


def prepare(source: Path | str, out: Path, *extra: str) -> tuple[int, dict]:
    rc = main([str(source), "--out", str(out), *extra])
    report_path = out / "import_report.json"
    return rc, json.loads(report_path.read_text()) if rc == 0 else {}


def write_spec(tmp_path: Path, body: str) -> Path:
    spec = tmp_path / "spec.toml"
    spec.write_text(f'name = "t"\nroot = "data"\nimage_size = {SIZE}\n' + body)
    return spec


def skipped(report: dict, reason: str) -> list[str]:
    return [s["path"] for s in report["skipped"] if s["reason"] == reason]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Class folders Happy/ (3 images) and Sad/ (2 images) under tmp_path/data."""
    root = tmp_path / "data"
    for i in range(3):
        draw(root / "Happy" / f"h{i}.png", seed=i)
    for i in range(2):
        draw(root / "Sad" / f"s{i}.png", seed=10 + i)
    return root


# ---- layouts that must import --------------------------------------------------------------------

def test_class_folders_with_attributes_csv_need_no_spec(folder: Path, tmp_path: Path) -> None:
    (folder / "attributes.csv").write_text(
        "path,label,gender,age\nHappy/h0.png,Happy,Female,Adult\nHappy/h1.png,,Male,\nSad/s0.png,Sad,Female,Baby\n")
    rc, report = prepare(folder, tmp_path / "out", "--size", str(SIZE))
    assert rc == 0
    ds = load_dataset(tmp_path / "out")
    m = ds.manifest.set_index("source_path")
    assert ds.classes == ("Happy", "Sad") and len(ds) == 5
    assert set(m["subset"]) == {"base"}
    assert m.loc["Happy/h0.png", "gender"] == "Female" and m.loc["Happy/h0.png", "age"] == "Adult"
    assert m.loc["Happy/h1.png", "gender"] == "Male" and m.isna().loc["Happy/h1.png", "age"]
    assert m.isna().loc["Sad/s1.png", "gender"]
    assert report["skipped"] == [] and report["counts"]["rows"]["base"] == {"Happy": 3, "Sad": 2}
    assert report["counts"]["groups"]["gender"] == {"Female": 2, "Male": 1, "null": 2}


def test_groups_differing_only_in_case_are_kept_apart_and_noted(folder: Path, tmp_path: Path) -> None:
    (folder / "attributes.csv").write_text("path,gender\nHappy/h0.png,Female\nHappy/h1.png,female \n"
                                           "Sad/s0.png,Male\n")
    rc, report = prepare(folder, tmp_path / "out", "--size", str(SIZE))
    assert rc == 0
    genders = load_dataset(tmp_path / "out").manifest["gender"]
    assert sorted(genders.dropna().unique()) == ["Female", "Male", "female"]  # nothing silently merged
    (note,) = [n for n in report["notes"] if "differ only in case" in n]
    assert note.startswith("gender: the groups ['Female', 'female']")


def test_manifest_matches_pixels(folder: Path, tmp_path: Path) -> None:
    assert prepare(folder, tmp_path / "out", "--size", str(SIZE))[0] == 0
    ds = load_dataset(tmp_path / "out")
    expected = {p.relative_to(folder).as_posix(): draw(tmp_path / "x.png", seed=s)
                for p, s in [(folder / "Happy/h2.png", 2), (folder / "Sad/s1.png", 11)]}
    for i, row in ds.manifest.iterrows():
        assert row["image_id"] == image_id(ds.pixels[i])
        if row["source_path"] in expected:
            np.testing.assert_array_equal(ds.pixels[i], expected[row["source_path"]])


def test_jpeg_named_png_is_decoded_by_content(tmp_path: Path) -> None:
    root = tmp_path / "data"
    pixels = draw(root / "Happy" / "looks_like.png", seed=1, fmt="JPEG")
    with open(root / "Happy" / "looks_like.png", "rb") as fh:
        assert fh.read(3) == b"\xff\xd8\xff"  # JPEG magic, despite the name
    rc, report = prepare(root, tmp_path / "out", "--size", str(SIZE))
    assert rc == 0 and report["skipped"] == []
    np.testing.assert_array_equal(load_dataset(tmp_path / "out").pixels[0], pixels)


def test_images_are_resized_and_made_grayscale(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "Happy").mkdir(parents=True)
    Image.new("RGB", (30, 20), (200, 10, 10)).save(root / "Happy" / "red.jpg")
    assert prepare(root, tmp_path / "out", "--size", "16")[0] == 0
    ds = load_dataset(tmp_path / "out")
    assert ds.pixels.shape == (1, 16, 16) and ds.pixels.dtype == np.uint8


def _stripes(path: Path) -> None:
    """A 48 x 16 image: black, white and black thirds side by side."""
    pixels = np.zeros((16, 48), dtype=np.uint8)
    pixels[:, 16:32] = 255
    Image.fromarray(pixels).save(path)


def test_non_square_images_are_centre_cropped_padded_or_stretched(tmp_path: Path) -> None:
    _stripes(tmp_path / "wide.png")
    crop = importer.decode_image(tmp_path / "wide.png", 16)
    assert (crop == 255).all()  # the centred 16 x 16 square is the white third
    stretch = importer.decode_image(tmp_path / "wide.png", 16, fit="stretch").astype(int)
    assert stretch[:, 0].max() == 0 and stretch[:, 8].min() == 255  # every row squeezed: black-white-black
    pad = importer.decode_image(tmp_path / "wide.png", 16, fit="pad").astype(int)
    assert pad[:5].max() == 0 and pad[-5:].max() == 0  # bands of the median border value (black)
    np.testing.assert_array_equal(pad[6:10], stretch[6:10])  # the whole image, squeezed into the middle
    square = draw(tmp_path / "square.png", seed=3, size=16)
    for fit in dataset_spec.IMAGE_FITS:  # a square image is only resized, the same way by each
        np.testing.assert_array_equal(importer.decode_image(tmp_path / "square.png", 16, fit), square)
    with pytest.raises(ValueError, match="image fit must be one of"):
        importer.decode_image(tmp_path / "wide.png", 16, fit="squash")


def test_prepare_counts_non_square_images_and_takes_the_fit(tmp_path: Path) -> None:
    root = tmp_path / "data"
    draw(root / "Happy" / "h0.png", seed=0)
    (root / "Sad").mkdir()
    _stripes(root / "Sad" / "wide.png")
    rc, report = prepare(root, tmp_path / "out", "--size", "16")
    assert rc == 0 and report["counts"]["non_square"] == {"base": 1}
    assert report["spec"]["image_fit"] == "crop"
    assert any(n.startswith("non-square images: 1; each kept its centred square") for n in report["notes"])
    ds = load_dataset(tmp_path / "out")
    assert (ds.pixels[(ds.manifest["label"] == "Sad").to_numpy()] == 255).all()
    rc, report = prepare(root, tmp_path / "out2", "--size", "16", "--fit", "stretch")
    assert rc == 0 and report["spec"]["image_fit"] == "stretch"
    ds = load_dataset(tmp_path / "out2")
    assert ds.pixels[(ds.manifest["label"] == "Sad").to_numpy()][0, :, 0].max() == 0
    spec = write_spec(tmp_path, 'classes_dir = "."\nimage_fit = "squash"\n')
    with pytest.raises(dataset_spec.DatasetError, match="key 'image_fit' must be one of .*got 'squash'"):
        dataset_spec.load_spec(spec)


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    face = np.random.default_rng(4).integers(0, 256, size=(16, 16), dtype=np.uint8)
    Image.fromarray(face.astype(np.uint16) * 257).save(tmp_path / "deep.png")  # 16-bit PNG, 0-65535
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    np.testing.assert_array_equal(importer.decode_image(tmp_path / "deep.png", 16), face)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    upright = np.zeros((16, 16), dtype=np.uint8)
    upright[:4] = 255  # a bright band at the top
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display", as a phone held sideways writes it
    Image.fromarray(upright).rotate(90).save(tmp_path / "phone.jpg", exif=exif, quality=100)
    decoded = importer.decode_image(tmp_path / "phone.jpg", 16).astype(int)
    assert decoded[:4].mean() > 200 and decoded[4:].mean() < 50  # the band is back at the top


def test_size_below_eight_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert main(["synthetic", "--size", "-3", "--out", str(tmp_path / "out")]) == 1
    assert "--size must be >= 8 pixels, got -3" in caplog.text
    assert not (tmp_path / "out").exists()


def test_attribute_tree_joins_renamed_copies_by_content(folder: Path, tmp_path: Path) -> None:
    tree = folder / "Biased" / "Gender"
    (tree / "Female" / "Happy").mkdir(parents=True)
    (tree / "Male" / "Sad").mkdir(parents=True)
    shutil.copy(folder / "Happy/h0.png", tree / "Female" / "Happy" / "renamed.png")
    shutil.copy(folder / "Sad/s1.png", tree / "Male" / "Sad" / "h0.png")  # a misleading name
    spec = write_spec(tmp_path, 'classes_dir = "."\nclasses = ["Happy", "Sad"]\n'
                      '[[attribute_trees]]\nattribute = "Gender"\ndir = "Biased/Gender"\n'
                      'value_map = { Female = "female" }\n')
    rc, report = prepare(spec, tmp_path / "out")
    assert rc == 0
    m = load_dataset(tmp_path / "out").manifest.set_index("source_path")
    assert m.loc["Happy/h0.png", "gender"] == "female" and m.loc["Sad/s1.png", "gender"] == "Male"
    assert m["gender"].isna().sum() == 3
    assert report["counts"]["annotations"]["gender"] == {"Male": 1, "female": 1}
    assert report["label_mismatches"] == [] and report["skipped"] == []


def test_tree_class_folder_disagreeing_with_label_is_reported(folder: Path, tmp_path: Path) -> None:
    target = folder / "Tree" / "Adult" / "Sad" / "x.png"
    target.parent.mkdir(parents=True)
    shutil.copy(folder / "Happy/h0.png", target)
    spec = write_spec(tmp_path, 'classes = ["Happy", "Sad"]\n'
                      '[[attribute_trees]]\nattribute = "age"\ndir = "Tree"\n')
    rc, report = prepare(spec, tmp_path / "out")
    assert rc == 0
    assert report["label_mismatches"] == [{"path": "Tree/Adult/Sad/x.png", "folder_label": "Sad",
                                           "label": "Happy", "kept": "Happy/h0.png"}]


def test_class_map_renames_classes_and_classes_fix_order(folder: Path, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, 'classes = ["Sad", "Joy"]\nclass_map = { Happy = "Joy" }\n')
    assert prepare(spec, tmp_path / "out")[0] == 0
    ds = load_dataset(tmp_path / "out")
    assert ds.classes == ("Sad", "Joy")
    assert Counter(ds.manifest["label"]) == {"Joy": 3, "Sad": 2}
    assert list(ds.manifest["label"][:2]) == ["Sad", "Sad"]  # rows in class order


def test_listed_class_without_images_is_noted(folder: Path, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, 'classes = ["Happy", "Sad", "Bored"]\n')
    rc, report = prepare(spec, tmp_path / "out")
    assert rc == 0 and load_dataset(tmp_path / "out").classes == ("Happy", "Sad", "Bored")
    assert "class 'Bored' is listed in the spec but no image has it" in report["notes"]


def test_json_table_keyed_by_file_name(folder: Path, tmp_path: Path) -> None:
    table = {"h1.png": {"Gender": "Male"}, "s0.png": {"gender": ""}}
    (folder / "attributes.json").write_text(json.dumps(table))
    spec = write_spec(tmp_path, '[[attribute_tables]]\npath = "attributes.json"\nkey = "filename"\n')
    rc, report = prepare(spec, tmp_path / "out")
    assert rc == 0 and report["skipped"] == []
    m = load_dataset(tmp_path / "out").manifest.set_index("source_path")
    assert m.loc["Happy/h1.png", "gender"] == "Male" and m["gender"].notna().sum() == 1


def test_table_file_name_matching_two_images_is_ambiguous(folder: Path, tmp_path: Path) -> None:
    draw(folder / "Sad" / "h0.png", seed=99)  # same name as Happy/h0.png, other pixels
    (folder / "attributes.csv").write_text("filename,gender\nh0.png,Female\n")
    rc, report = prepare(folder, tmp_path / "out", "--size", str(SIZE))
    assert rc == 0 and skipped(report, importer.AMBIGUOUS) == ["h0.png"]


# ---- extras ----------------------------------------------------------------------------------------

def test_extras_get_their_subset_and_fixed_attribute(folder: Path, tmp_path: Path) -> None:
    draw(folder / "More" / "Happy" / "new.jpg", seed=50, fmt="JPEG")
    shutil.copy(folder / "Happy/h2.png", folder / "More" / "Happy" / "dup_of_h2.jpg")
    (folder / "attributes.csv").write_text("path,gender\nHappy/h2.png,Male\n")
    spec = write_spec(tmp_path, 'classes_dir = "."\nclasses = ["Happy", "Sad"]\n'
                      '[[attribute_tables]]\npath = "attributes.csv"\n'
                      '[[extras]]\nname = "extra"\ndir = "More"\nattributes = { gender = "Female" }\n'
                      '[expected]\nextras = { extra = 2 }\nextra_duplicates = { extra = 1 }\n')
    rc, report = prepare(spec, tmp_path / "out")
    assert rc == 0
    m = load_dataset(tmp_path / "out").manifest.set_index("source_path")
    assert tuple(m.loc["More/Happy/new.jpg", ["subset", "gender"]]) == ("extra", "Female")
    assert tuple(m.loc["Happy/h2.png", ["subset", "gender"]]) == ("base", "Male")  # base annotation kept
    assert "More/Happy/dup_of_h2.jpg" not in m.index and len(m) == 6
    merged = [e for e in report["merged"] if e["reason"] == importer.EXTRA_IN_BASE]
    assert merged == [{"image_id": m.loc["Happy/h2.png", "image_id"], "kept": "Happy/h2.png",
                       "merged": "More/Happy/dup_of_h2.jpg", "subset": "extra",
                       "reason": importer.EXTRA_IN_BASE}]
    assert all(c["ok"] for c in report["expected"]) and len(report["expected"]) == 2
    assert report["counts"]["rows"] == {"base": {"Happy": 3, "Sad": 2}, "extra": {"Happy": 1}}


def test_expected_counts_that_differ_are_noted(folder: Path, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, '[expected]\nimages = 6\nclasses = { Happy = 3 }\n')
    rc, report = prepare(spec, tmp_path / "out")
    assert rc == 0
    assert [c["ok"] for c in report["expected"]] == [False, True]
    assert "expected images = 6, found 5" in report["notes"]


# ---- merges and conflicts --------------------------------------------------------------------------

def test_same_pixels_same_label_are_merged(folder: Path, tmp_path: Path) -> None:
    shutil.copy(folder / "Happy/h1.png", folder / "Happy/h9.png")
    rc, report = prepare(folder, tmp_path / "out", "--size", str(SIZE))
    assert rc == 0 and len(load_dataset(tmp_path / "out")) == 5
    assert [(e["kept"], e["merged"], e["reason"]) for e in report["merged"]] == [
        ("Happy/h1.png", "Happy/h9.png", importer.SAME_LABEL)]
    assert report["counts"]["files"]["base"] == {"Happy": 4, "Sad": 2}


def test_same_pixels_different_labels_are_dropped_and_reported(folder: Path, tmp_path: Path) -> None:
    shutil.copy(folder / "Happy/h1.png", folder / "Sad/odd.png")
    tree = folder / "Gender" / "Male" / "x.png"
    tree.parent.mkdir(parents=True)
    shutil.copy(folder / "Happy/h1.png", tree)
    spec = write_spec(tmp_path, 'classes = ["Happy", "Sad"]\n'
                      '[[attribute_trees]]\nattribute = "gender"\ndir = "Gender"\n')
    rc, report = prepare(spec, tmp_path / "out")
    assert rc == 0
    assert set(load_dataset(tmp_path / "out").manifest["source_path"]) == {
        "Happy/h0.png", "Happy/h2.png", "Sad/s0.png", "Sad/s1.png"}
    (conflict,) = report["label_conflicts"]
    assert conflict["paths"] == ["Happy/h1.png", "Sad/odd.png"] and conflict["labels"] == ["Happy", "Sad"]
    assert skipped(report, importer.MATCH_DROPPED) == ["Gender/Male/x.png"]


def test_table_label_disagreeing_with_folder_is_a_conflict(folder: Path, tmp_path: Path) -> None:
    (folder / "attributes.csv").write_text("path,label,gender\nHappy/h0.png,Sad,Male\n")
    rc, report = prepare(folder, tmp_path / "out", "--size", str(SIZE))
    assert rc == 0 and "Happy/h0.png" not in set(load_dataset(tmp_path / "out").manifest["source_path"])
    (conflict,) = report["label_conflicts"]
    assert conflict["reason"] == importer.TABLE_LABEL and conflict["table_label"] == "Sad"


def test_image_in_two_groups_of_one_attribute_gets_null(folder: Path, tmp_path: Path) -> None:
    for group in ("Adult", "Senior"):
        (folder / "Age" / group).mkdir(parents=True)
        shutil.copy(folder / "Sad/s0.png", folder / "Age" / group / f"{group}.png")
    shutil.copy(folder / "Sad/s1.png", folder / "Age" / "Adult" / "ok.png")
    spec = write_spec(tmp_path, 'classes = ["Happy", "Sad"]\n'
                      '[[attribute_trees]]\nattribute = "age"\ndir = "Age"\n')
    rc, report = prepare(spec, tmp_path / "out")
    assert rc == 0
    m = load_dataset(tmp_path / "out").manifest.set_index("source_path")
    assert m.isna().loc["Sad/s0.png", "age"] and m.loc["Sad/s1.png", "age"] == "Adult"
    (conflict,) = report["attribute_conflicts"]
    assert conflict["attribute"] == "age" and sorted(conflict["values"]) == ["Adult", "Senior"]


# ---- bad input: skipped, counted, named --------------------------------------------------------------

def _truncated(path: Path, fmt: str = "JPEG") -> None:
    draw(path, seed=7, fmt=fmt, size=64)
    path.write_bytes(path.read_bytes()[:200])


BAD_FILES = {
    "empty.png": (lambda p: p.write_bytes(b""), importer.ZERO_BYTE),
    "notes.txt": (lambda p: p.write_text("not a picture"), importer.NOT_IMAGE),
    "truncated.png": (_truncated, importer.CORRUPT),
    "cut.png": (lambda p: _truncated(p, "PNG"), importer.CORRUPT),
    "garbage.png": (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40), importer.NOT_IMAGE),
    ".DS_Store": (lambda p: p.write_bytes(b"\x00\x01"), importer.HIDDEN),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_image_files_are_skipped_with_reason(folder: Path, tmp_path: Path, name: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    make, reason = BAD_FILES[name]
    make(folder / "Happy" / name)
    rc, report = prepare(folder, tmp_path / "out", "--size", str(SIZE))
    assert rc == 0 and len(load_dataset(tmp_path / "out")) == 5
    assert report["skipped"][0]["path"] == f"Happy/{name}" and report["skipped"][0]["reason"] == reason
    assert report["counts"]["skipped"] == {reason: 1}
    assert f"Happy/{name}" in caplog.text and reason in caplog.text


def test_unknown_class_folders_and_loose_files_are_skipped(folder: Path, tmp_path: Path) -> None:
    draw(folder / "Angry" / "a.png", seed=30)
    draw(folder / "Happy" / "deeper" / "d.png", seed=31)
    draw(folder / "loose.png", seed=32)
    spec = write_spec(tmp_path, 'classes = ["Happy", "Sad"]\n')
    rc, report = prepare(spec, tmp_path / "out")
    assert rc == 0 and len(load_dataset(tmp_path / "out")) == 5
    assert skipped(report, importer.UNKNOWN_CLASS) == ["Angry/a.png"]
    assert skipped(report, importer.NESTED) == ["Happy/deeper/d.png"]
    assert skipped(report, importer.NOT_IN_CLASS) == ["loose.png"]


def test_tree_files_matching_no_image_are_skipped(folder: Path, tmp_path: Path) -> None:
    draw(folder / "G" / "Female" / "Happy" / "stranger.png", seed=40)
    draw(folder / "G" / "loose.png", seed=41)
    spec = write_spec(tmp_path, 'classes = ["Happy", "Sad"]\n'
                      '[[attribute_trees]]\nattribute = "gender"\ndir = "G"\n')
    rc, report = prepare(spec, tmp_path / "out")
    assert rc == 0
    assert skipped(report, importer.NO_MATCH) == ["G/Female/Happy/stranger.png"]
    assert skipped(report, importer.NOT_IN_GROUP) == ["G/loose.png"]
    assert load_dataset(tmp_path / "out").manifest["gender"].isna().all()


@pytest.mark.parametrize(("key", "reason"), [
    ("Happy/missing.png", importer.NO_FILE),
    ("../outside.png", dataset_spec.ESCAPES),
    ("Happy/../../outside.png", dataset_spec.ESCAPES),
    ("/etc/passwd", dataset_spec.ABSOLUTE),
    ("C:\\faces\\a.png", dataset_spec.ABSOLUTE),
    ("attributes.csv", importer.NOT_IMPORTED),
    ("", importer.NO_KEY),
])
def test_bad_table_rows_are_skipped(folder: Path, tmp_path: Path, key: str, reason: str) -> None:
    draw(tmp_path / "outside.png", seed=60)
    (folder / "attributes.csv").write_text(f"path,gender\nHappy/h0.png,Female\n{key},Male\n")
    rc, report = prepare(folder, tmp_path / "out", "--size", str(SIZE))
    assert rc == 0
    (entry,) = report["skipped"]
    assert entry["reason"] == reason and entry["path"] == (key or "attributes.csv:3")
    assert load_dataset(tmp_path / "out").manifest["gender"].notna().sum() == 1


def test_table_file_name_with_no_file_is_skipped(folder: Path, tmp_path: Path) -> None:
    (folder / "attributes.csv").write_text("filename,gender\nnope.png,Male\n")
    rc, report = prepare(folder, tmp_path / "out", "--size", str(SIZE))
    assert rc == 0 and skipped(report, importer.NO_NAME) == ["nope.png"]


# ---- bad specs and hopeless input: exit 1 with a message ----------------------------------------------

@pytest.mark.parametrize(("body", "words"), [
    ('colour = "red"\n', ["unknown config key 'colour'"]),
    ("classes_dir = 3\n", ["'classes_dir'", "str"]),
    ('classes = "Happy"\n', ["'classes'"]),
    ('[[attribute_trees]]\nattribute = "age"\ndir = "A"\nvalues = 1\n', ["attribute_trees #1", "'values'"]),
    ('[[attribute_trees]]\nattribute = "age"\n', ["missing required key 'dir'"]),
    ('attribute_trees = "x"\n', ["'attribute_trees'", "list of tables"]),
    ('class_map = { Happy = 3 }\n', ["'class_map'"]),
    ('classes = ["Sad"]\nclass_map = { Happy = "Joy" }\n', ["class_map", "'Joy'", "not in classes"]),
    ('[[extras]]\ndir = "../elsewhere"\n', ["'dir'", "inside the dataset root"]),
    ('[expected]\nimages = "many"\n', ["'expected.images'"]),
    ('[[attribute_tables]]\npath = "a.csv"\nkey = "row"\n', ["'key'", "'row'"]),
])
def test_bad_spec_is_an_error_naming_key_and_file(folder: Path, tmp_path: Path, body: str, words: list[str],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    spec = write_spec(tmp_path, body)
    assert prepare(spec, tmp_path / "out")[0] == 1
    assert str(spec) in caplog.text and all(w in caplog.text for w in words), caplog.text
    assert not (tmp_path / "out").exists()


def test_spec_override_on_command_line_is_checked(folder: Path, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    spec = write_spec(tmp_path, "")
    assert prepare(spec, tmp_path / "out", "nme=x")[0] == 1
    assert "command line" in caplog.text and "'nme'" in caplog.text
    assert prepare(spec, tmp_path / "out2", "name=renamed")[0] == 0
    assert json.loads((tmp_path / "out2" / "import_report.json").read_text())["name"] == "renamed"


def test_missing_folders_are_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert prepare(tmp_path / "nowhere", tmp_path / "out")[0] == 1
    assert "nowhere: no such spec file or folder" in caplog.text
    (tmp_path / "data").mkdir()
    spec = write_spec(tmp_path, '[[attribute_trees]]\nattribute = "age"\ndir = "Age"\n')
    assert prepare(spec, tmp_path / "out")[0] == 1
    assert "Age: folder not found" in caplog.text


def test_nothing_usable_exits_nonzero(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "data"
    (root / "Happy").mkdir(parents=True)
    (root / "Happy" / "a.png").write_bytes(b"")
    (root / "Happy" / "b.txt").write_text("hello")
    assert prepare(root, tmp_path / "out")[0] == 1
    assert "nothing usable to import" in caplog.text and "zero-byte file" in caplog.text
    assert not (tmp_path / "out").exists()


# ---- the entry point ------------------------------------------------------------------------------------

def test_help_exits_zero(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "synthetic" in capsys.readouterr().out


def test_smoke_test_reads_few_files_per_folder(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for i in range(importer.SMOKE_FILES + 3):
        draw(root / "Happy" / f"{i}.png", seed=i)
    rc, report = prepare(root, tmp_path / "out", "--size", str(SIZE), "--smoke-test")
    assert rc == 0 and len(load_dataset(tmp_path / "out")) == importer.SMOKE_FILES
    assert report["smoke_test"] and any("smoke test" in n for n in report["notes"])


def test_synthetic_source(tmp_path: Path) -> None:
    pytest.importorskip("fer_core.synthetic")
    rc = main(["synthetic", "--out", str(tmp_path / "out"), "n=16", "seed=3"])
    assert rc == 0
    ds = load_dataset(tmp_path / "out")
    assert len(ds) == 16 and {"gender", "age"} <= set(ds.attributes)
    assert main(["synthetic", "--out", str(tmp_path / "bad"), "bogus=1"]) == 1


# ---- the real dataset ---------------------------------------------------------------------------------

def _files(folder: Path) -> int:
    return sum(len(names) for _, _, names in os.walk(folder))


@pytest.fixture(scope="module")
def fer4_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    if not FER4.is_dir():
        pytest.skip(f"real dataset not found at {FER4.resolve()} "
                    "(the realdata tests expect ../shared/data/fer4 beside the repository)")
    out = tmp_path_factory.mktemp("fer4")
    spec = Path(__file__).parents[1] / "experiments" / "datasets" / "fer4.toml"
    assert main([str(spec), "--root", str(FER4), "--out", str(out)]) == 0
    return json.loads((out / "import_report.json").read_text()), out


@pytest.mark.realdata
def test_fer4_file_counts_match_readme(fer4_report: tuple[dict, Path]) -> None:
    report, _ = fer4_report
    readme = {"Engaged": 618, "Happy": 510, "Neutral": 587, "Surprised": 500}
    on_disk = {c: _files(FER4 / "Data" / c) for c in readme}
    assert on_disk == readme
    renamed = {("Focused" if c == "Engaged" else c): n for c, n in readme.items()}
    assert report["counts"]["files"]["base"] == renamed
    gender = {g: _files(FER4 / "Biased Data" / "Gender" / g) for g in ("Female", "Male")}
    age = {g: _files(FER4 / "Biased Data" / "Age" / g) for g in ("Adult", "Baby", "Children", "Senior")}
    assert gender == {"Female": 966, "Male": 1192} == report["counts"]["annotations"]["gender"]
    assert age == {"Adult": 1651, "Baby": 112, "Children": 199, "Senior": 238}
    assert age == report["counts"]["annotations"]["age"]
    assert _files(FER4 / "Extra Data") == 518 == sum(report["counts"]["files"]["extra"].values())
    assert all(c["ok"] for c in report["expected"]) and len(report["expected"]) == 13


@pytest.mark.realdata
def test_fer4_rows_account_for_every_file(fer4_report: tuple[dict, Path]) -> None:
    report, out = fer4_report
    ds = load_dataset(out)
    base = ds.base()
    files = sum(report["counts"]["files"]["base"].values())
    merged = sum(e["subset"] == "base" for e in report["merged"])
    dropped = sum(e["subsets"].count("base") for e in report["label_conflicts"])
    assert len(base) == files - merged - dropped
    assert report["skipped"] == [s for s in report["skipped"] if s["reason"] == importer.MATCH_DROPPED]
    assert len(ds.extras()) + report["counts"]["extra_duplicates"]["extra"]["files"] + sum(
        e["subset"] == "extra" and e["reason"] == importer.SAME_LABEL for e in report["merged"]) == 518
    assert ds.manifest["image_id"].is_unique
    assert ds.classes == ("Focused", "Happy", "Neutral", "Surprised")
    assert len(report["notes"]) >= 4


@pytest.mark.realdata
def test_fer4_duplicates_in_data_found_independently(fer4_report: tuple[dict, Path]) -> None:
    report, _ = fer4_report
    seen: dict[bytes, set[str]] = {}
    for path in sorted(p for p in (FER4 / "Data").rglob("*") if p.is_file()):
        with Image.open(path) as img:
            seen.setdefault(img.convert("L").tobytes(), set()).add(path.parent.name)
    conflicts = sum(len(labels) > 1 for labels in seen.values())
    assert len(report["label_conflicts"]) == conflicts
    assert sum(report["counts"]["rows"]["base"].values()) == len(seen) - conflicts
    logging.getLogger(__name__).info("fer4: %d files, %d distinct pixel arrays", 2215, len(seen))
