"""Image reading, the classifier transform and the detectors' bilinear resize."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from res2det.images import classification_input, load_image, to_rgb_uint8
from res2det.errors import Res2DetError
from res2det.structures import Preprocess

from conftest import REFERENCE, SHARED

PHOTO = SHARED / "data" / "tiny_coco" / "val2017" / "000000006818.jpg"


def test_classification_transform_reproduces_timm_input():
    if not PHOTO.is_file():
        pytest.skip("tiny_coco not found beside the repository")
    x = classification_input(PHOTO, Preprocess())
    ref = torch.load(REFERENCE / "parity" / "timm_input_224.pt", weights_only=True)["input"][0]
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-6)


def test_bad_images_name_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(Res2DetError, match="broken.jpg: not a readable image"):
        load_image(bad)
    with pytest.raises(Res2DetError, match="missing.png: image file not found"):
        load_image(tmp_path / "missing.png")


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "P"])
def test_modes_become_rgb(tmp_path, mode):
    arr = (np.arange(12 * 10).reshape(12, 10) % 256).astype(np.uint16 if mode == "I;16" else np.uint8)
    if mode == "I;16":
        arr = arr * 256
    img = Image.fromarray(arr).convert(mode) if mode not in ("L", "I;16") else Image.fromarray(arr)
    path = tmp_path / "x.png"
    img.save(path)
    out = to_rgb_uint8(path)
    assert out.shape == (12, 10, 3) and out.dtype == np.uint8 and out.max() > 100


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    assert load_image(path).size == (20, 40)


def test_array_and_tensor_inputs():
    arr = np.random.default_rng(0).integers(0, 255, (8, 6, 3), dtype=np.uint8)
    assert np.array_equal(to_rgb_uint8(torch.from_numpy(arr).permute(2, 0, 1)), arr)
    assert np.array_equal(to_rgb_uint8(torch.from_numpy(arr).float() / 255), arr)
    with pytest.raises(Res2DetError):
        to_rgb_uint8(np.zeros((4, 4, 2), np.uint8))


def test_dark_16bit_image_is_not_brightened(tmp_path):
    """A 16-bit image whose values all lie below 256 is still 16-bit: 200/65535 of full scale, not 200/255."""
    Image.fromarray(np.full((4, 4), 200, np.uint16)).save(tmp_path / "dark.png")
    Image.fromarray(np.full((4, 4), 40000, np.uint16)).save(tmp_path / "mid.png")
    assert to_rgb_uint8(tmp_path / "dark.png").max() == 1  # round(200 * 255 / 65535)
    assert to_rgb_uint8(tmp_path / "mid.png").max() == 156  # rounded, not truncated (155.6)


def test_resize_equals_opencv_and_ignores_the_thread_count():
    """``resize_bilinear`` against cv2.resize(INTER_LINEAR) outputs recorded by fixtures/make_opencv_resize.py
    (up, down, mixed, 1x1 and strip sizes), at 1 and 2 threads (F.interpolate's float path differs between
    them on .5 ties)."""
    from pathlib import Path

    from res2det.images import resize_bilinear

    data = np.load(Path(__file__).parent / "fixtures" / "opencv_resize.npz")
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for i, (w, h) in enumerate(data["sizes"].tolist()):
                np.testing.assert_array_equal(resize_bilinear(data["image"], w, h), data[f"out{i}"])
    finally:
        torch.set_num_threads(threads)
