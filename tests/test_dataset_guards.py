"""Opening a dataset from broken or hostile input: duplicates, label conflicts, one-class eval sets, image
modes that convert("RGB") gets wrong, truncated files, and the train/eval content guard. Real files only."""
import hashlib
import os

import numpy as np
import pytest
from PIL import Image

from core.datasets import DatasetError, ImageSet, open_image_folder, open_manifest, to_rgb
from tests.images import write_image


def _manifest(tmp_path, rows, name="m.csv"):
    (tmp_path / name).write_text("path,label,split\n" + "".join(",".join(row) + "\n" for row in rows))
    return tmp_path / name


def _names(paths):
    return [os.path.basename(p) for p in paths]


def _three_images(tmp_path):
    for seed, name in enumerate(["a", "b", "c"]):
        write_image(tmp_path / f"{name}.png", seed=seed)


def test_duplicate_rows_and_spellings_of_one_file_count_once(tmp_path):
    _three_images(tmp_path)
    os.symlink(tmp_path / "a.png", tmp_path / "link.png")
    imageset = open_manifest(_manifest(tmp_path, [
        ("a.png", "x", "eval"), ("a.png", "x", "eval"), ("./sub/../a.png", "x", "eval"),
        ("link.png", "x", "eval"), ("b.png", "y", "eval"), ("c.png", "y", "eval"),
    ]))
    assert _names(imageset.paths) == ["a.png", "b.png", "c.png"]
    assert imageset.class_counts("eval") == {"x": 1, "y": 2}
    assert len(imageset.duplicates) == 3
    reasons = sorted((_names([d.kept])[0], _names([d.dropped])[0], d.reason) for d in imageset.duplicates)
    assert reasons == [("a.png", "a.png", "path listed again")] * 2 + [("a.png", "link.png", "same file")]


def test_same_path_with_two_labels_names_the_file_and_the_fix(tmp_path):
    _three_images(tmp_path)
    path = _manifest(tmp_path, [("a.png", "x", "eval"), ("b.png", "y", "eval"), ("a.png", "y", "train")])
    with pytest.raises(DatasetError) as error:
        open_manifest(path)
    message = str(error.value)
    assert f"{tmp_path / 'a.png'}: labelled x, y" in message
    assert "b.png" not in message and "fix or delete the conflicting rows" in message


def test_label_conflicts_list_ten_files_then_a_count(tmp_path):
    rows = []
    for i in range(12):
        write_image(tmp_path / f"{i:02d}.png", seed=i, size=4)
        rows += [(f"{i:02d}.png", "x", "eval"), (f"{i:02d}.png", "y", "eval")]
    with pytest.raises(DatasetError) as error:
        open_manifest(_manifest(tmp_path, rows))
    assert str(error.value).count("labelled x, y") == 10 and "... and 2 more" in str(error.value)


def test_identical_content_under_two_paths_is_kept_once(tmp_path):
    _three_images(tmp_path)
    (tmp_path / "z-copy.png").write_bytes((tmp_path / "a.png").read_bytes())
    imageset = open_manifest(_manifest(tmp_path, [
        ("z-copy.png", "x", "eval"), ("a.png", "x", "eval"), ("b.png", "y", "eval"), ("c.png", "y", "eval")]))
    assert _names(imageset.paths) == ["a.png", "b.png", "c.png"]
    [dup] = imageset.duplicates
    assert (_names([dup.kept, dup.dropped]), dup.reason) == (["a.png", "z-copy.png"], "identical bytes")
    assert imageset.hashes == tuple(hashlib.sha256((tmp_path / os.path.basename(p)).read_bytes()).hexdigest() for p in imageset.paths)


def test_identical_content_with_two_labels_is_an_error(tmp_path):
    _three_images(tmp_path)
    (tmp_path / "copy.png").write_bytes((tmp_path / "b.png").read_bytes())
    with pytest.raises(DatasetError, match=r"copy\.png and .*b\.png \(identical bytes\): labelled x, y"):
        open_manifest(_manifest(tmp_path, [("a.png", "x", "eval"), ("b.png", "y", "eval"), ("copy.png", "x", "eval")]))


def test_content_in_train_and_eval_keeps_the_eval_copy(tmp_path):
    for split, seeds in [("train", [1, 2, 3]), ("val", [3, 4, 5])]:  # seed 3 is the same image in both
        for seed in seeds:
            write_image(tmp_path / "ds" / split / ("p" if seed % 2 else "q") / f"{seed}.png", seed=seed)
    imageset = open_image_folder(tmp_path / "ds")
    assert sorted(_names(imageset.paths[r] for r in imageset.split("train"))) == ["1.png", "2.png"]
    assert sorted(_names(imageset.paths[r] for r in imageset.split("eval"))) == ["3.png", "4.png", "5.png"]
    [dup] = imageset.duplicates
    assert "/val/" in dup.kept and "/train/" in dup.dropped and "train copy is dropped" in dup.reason
    imageset.check_disjoint(imageset.split("train"), imageset.split("eval"))  # disjoint: no error


def test_check_disjoint_names_rows_sharing_content(tmp_path):
    _three_images(tmp_path)
    imageset = open_manifest(_manifest(tmp_path, [("a.png", "x", "eval"), ("b.png", "y", "eval"), ("c.png", "y", "train")]))
    row_a = imageset.paths.index(str(tmp_path / "a.png"))
    with pytest.raises(DatasetError, match=r"1 training rows .*\n  train .*a\.png  =  eval .*a\.png"):
        imageset.check_disjoint([imageset.split("train")[0], row_a], imageset.split("eval"))
    # A set built by hand carries no hashes: the guard reads the files, and catches a copy under another name.
    (tmp_path / "copy.png").write_bytes((tmp_path / "b.png").read_bytes())
    paths = (str(tmp_path / "b.png"), str(tmp_path / "copy.png"), str(tmp_path / "c.png"))
    by_hand = ImageSet("h", paths, np.array([0, 0, 1]), ("x", "y"), np.array(["eval", "train", "train"]), "f")
    with pytest.raises(DatasetError, match=r"train .*copy\.png  =  eval .*b\.png"):
        by_hand.check_disjoint([1, 2], [0])
    by_hand.check_disjoint([2], [0])


def test_eval_split_needs_two_classes_but_singleton_classes_are_fine(tmp_path):
    _three_images(tmp_path)
    with pytest.raises(DatasetError, match="only class 'x'.*at least two classes"):
        open_manifest(_manifest(tmp_path, [("a.png", "x", "eval"), ("b.png", "x", "eval"), ("c.png", "y", "train")]))
    with pytest.raises(DatasetError, match="no images.*at least two classes"):
        open_manifest(_manifest(tmp_path, [("a.png", "x", "train"), ("b.png", "y", "train")]))
    assert open_manifest(_manifest(tmp_path, [("a.png", "x", "eval"), ("b.png", "y", "eval")])).class_counts() == {"x": 1, "y": 1}


def test_limit_per_class_tops_up_past_duplicates(tmp_path):
    for i in range(6):
        write_image(tmp_path / "ds" / "q" / f"{i}.png", seed=100 + i)
        write_image(tmp_path / "ds" / "p" / f"{i}.png", seed=i % 2)  # p holds only two distinct images
    for i in range(3):
        write_image(tmp_path / "ds" / "r" / f"{i}.png", seed=200 + i)
    imageset = open_image_folder(tmp_path / "ds", limit_per_class=3, seed=5)
    assert imageset.class_counts() == {"p": 2, "q": 3, "r": 3}
    assert len(set(imageset.hashes)) == len(imageset) == 8


def _pixels(path, mode_check=None):
    with Image.open(path) as image:
        if mode_check:
            assert image.mode == mode_check
        return np.asarray(to_rgb(image))


def test_sixteen_bit_greyscale_scales_to_eight_bits(tmp_path):
    values = np.array([[0, 128, 129, 257, 32896, 65535]], dtype=np.uint16)
    by_hand = [0, 0, 1, 1, 128, 255]  # round(v / 257): 128/257 = 0.498, 129/257 = 0.502, 32896 = 128 * 257
    Image.fromarray(values).save(tmp_path / "a.png")
    rgb = _pixels(tmp_path / "a.png", "I;16")
    assert rgb.shape == (1, 6, 3) and rgb.dtype == np.uint8
    assert rgb[0].tolist() == [[v, v, v] for v in by_hand]
    # PIL reads 16-bit PGM as mode I: the same values must give the same pixels.
    (tmp_path / "a.pgm").write_bytes(b"P5\n6 1\n65535\n" + values.astype(">u2").tobytes())
    assert _pixels(tmp_path / "a.pgm", "I").tolist() == rgb.tolist()
    # Through the dataset: rows decode the same way, and the old clipping would have given 255 for 129.
    write_image(tmp_path / "b.png", seed=1)
    imageset = open_manifest(_manifest(tmp_path, [("a.png", "x", "eval"), ("b.png", "y", "eval")]))
    assert np.asarray(imageset.load_image(0))[0, :, 0].tolist() == by_hand


def test_float_and_signed_integer_images_scale_by_their_range(tmp_path):
    Image.fromarray(np.array([[0.0, 0.25, 1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    assert _pixels(tmp_path / "f.tif", "F")[0, :, 0].tolist() == [0, 64, 255]  # 0.25 * 255 = 63.75
    Image.fromarray(np.array([[-100, 0, 300]], dtype=np.int32)).save(tmp_path / "i.tif")
    assert _pixels(tmp_path / "i.tif", "I")[0, :, 0].tolist() == [0, 64, 255]  # (0 + 100) / 400 * 255 = 63.75


def test_transparency_composites_over_white(tmp_path):
    Image.fromarray(np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [100, 0, 200, 128]]], np.uint8), "RGBA").save(tmp_path / "rgba.png")
    rgb = _pixels(tmp_path / "rgba.png", "RGBA")[0].astype(int)
    half = [round(c * 128 / 255 + 255 * 127 / 255) for c in (100, 0, 200)]
    assert rgb[0].tolist() == [255, 255, 255] and rgb[1].tolist() == [10, 20, 30]
    assert np.abs(rgb[2] - half).max() <= 1
    Image.fromarray(np.array([[[50, 0], [50, 255]]], np.uint8), "LA").save(tmp_path / "la.png")
    assert _pixels(tmp_path / "la.png", "LA")[0].tolist() == [[255, 255, 255], [50, 50, 50]]
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png", transparency=0)
    assert _pixels(tmp_path / "p.png", "P")[0].tolist() == [[255, 255, 255], [200, 10, 10]]


def test_cmyk_and_one_bit_images(tmp_path):
    Image.fromarray(np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255]]], np.uint8), "CMYK").save(tmp_path / "c.tif")
    assert _pixels(tmp_path / "c.tif", "CMYK")[0].tolist() == [[255, 255, 255], [0, 255, 255], [0, 0, 0]]
    Image.fromarray(np.array([[False, True]])).save(tmp_path / "b.png")
    assert _pixels(tmp_path / "b.png", "1")[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_truncated_jpeg_and_png_are_skipped_at_open(tmp_path):
    for c, name in enumerate(["p", "q"]):
        for i in range(2):
            write_image(tmp_path / "ds" / name / f"{i}.jpg", seed=10 * c + i, size=64, fmt="JPEG")
    good = (tmp_path / "ds" / "p" / "0.jpg").read_bytes()
    cut = tmp_path / "ds" / "p" / "cut.jpg"
    cut.write_bytes(good[: len(good) - 200])
    with Image.open(cut) as image:
        image.verify()  # PIL's structural check passes: only decoding the pixels would fail
    padded = tmp_path / "ds" / "q" / "padded.jpg"
    write_image(padded, seed=77, size=64, fmt="JPEG")
    padded.write_bytes(padded.read_bytes() + b"\0" * 100)
    write_image(tmp_path / "ds" / "q" / "full.png", seed=78)
    png = (tmp_path / "ds" / "q" / "full.png").read_bytes()
    assert png.endswith(b"IEND\xaeB`\x82")
    (tmp_path / "ds" / "q" / "noend.png").write_bytes(png[:-12])
    imageset = open_image_folder(tmp_path / "ds")
    reasons = {os.path.basename(s.path): s.reason for s in imageset.skipped}
    assert set(reasons) == {"cut.jpg", "noend.png"}
    assert reasons["cut.jpg"].startswith("truncated JPEG") and reasons["noend.png"].startswith("truncated PNG")
    assert sorted(_names(imageset.paths)) == ["0.jpg", "0.jpg", "1.jpg", "1.jpg", "full.png", "padded.jpg"]
    for row in range(len(imageset)):
        assert imageset.load_image(row).mode == "RGB"


def test_manifest_row_for_a_missing_file_is_skipped(tmp_path):
    _three_images(tmp_path)
    imageset = open_manifest(_manifest(tmp_path, [("a.png", "x", "eval"), ("gone.png", "x", "eval"), ("b.png", "y", "eval")]))
    assert _names(imageset.paths) == ["a.png", "b.png"]
    assert [(os.path.basename(s.path), s.reason) for s in imageset.skipped] == [("gone.png", "file not found")]


def test_rows_naming_a_fifo_or_a_folder_are_skipped_without_reading(tmp_path):
    _three_images(tmp_path)
    os.mkfifo(tmp_path / "pipe.png")  # opening it to read would block until a writer appears
    (tmp_path / "folder.png").mkdir()
    imageset = open_manifest(_manifest(tmp_path, [
        ("a.png", "x", "eval"), ("pipe.png", "x", "eval"), ("folder.png", "y", "eval"), ("b.png", "y", "eval")]))
    assert _names(imageset.paths) == ["a.png", "b.png"]
    assert sorted((os.path.basename(s.path), s.reason) for s in imageset.skipped) == [
        ("folder.png", "not a regular file"), ("pipe.png", "not a regular file")]


def test_fingerprint_of_plain_images_is_unchanged_and_rescaled_modes_are_marked(tmp_path):
    _three_images(tmp_path)
    rows = [("a.png", "x", "eval"), ("b.png", "y", "eval"), ("c.png", "y", "train")]

    def plain_formula(rows):  # the formula caches were keyed by before images were hashed at open
        digest = hashlib.sha256()
        for name, label, split in sorted(rows):
            path = str(tmp_path / name)
            stat = os.stat(path)
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{label}\0{split}\n".encode())
        return digest.hexdigest()

    assert open_manifest(_manifest(tmp_path, rows)).fingerprint == plain_formula(rows)
    Image.fromarray(np.array([[0, 65535]], dtype=np.uint16)).save(tmp_path / "d.png")
    rows.append(("d.png", "x", "eval"))
    assert open_manifest(_manifest(tmp_path, rows)).fingerprint != plain_formula(rows)


def test_a_decompression_bomb_is_skipped_from_its_header(tmp_path):
    """A 1-bit PNG of 9000 x 9000 pixels is a few KB on disk and 81 megapixels decoded: skipped at open."""
    from PIL import Image

    from core.datasets import MAX_IMAGE_PIXELS, open_image_folder
    from tests.images import write_image

    for c in ("a", "b"):
        for i in range(2):
            write_image(tmp_path / c / f"{i}.png", seed=10 * ord(c) + i)
    Image.new("1", (9000, 9000)).save(tmp_path / "a" / "bomb.png")
    assert 9000 * 9000 > MAX_IMAGE_PIXELS and (tmp_path / "a" / "bomb.png").stat().st_size < 100_000
    imageset = open_image_folder(tmp_path)
    assert len(imageset) == 4
    (skipped,) = imageset.skipped
    assert skipped.path.endswith("bomb.png") and "too large to decode safely" in skipped.reason
