"""fastres.images: decoding any Pillow image to uint8 RGB, and finding images in files and folders."""

import io
import sys

import numpy as np
import pytest
import torch

import fastres
from fastres.images import decode_image, find_images

Image = pytest.importorskip("PIL.Image", reason="Pillow (the images extra) is not installed")


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 256, (height, width, 3), dtype=np.uint8)


def encode(img, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_png_round_trip_is_exact(tmp_path):
    array = random_rgb(13, 17)
    path = tmp_path / "x.png"
    Image.fromarray(array).save(path)
    for source in (path, str(path), path.read_bytes()):
        out = decode_image(source)
        assert out.dtype == torch.uint8 and out.shape == (3, 13, 17) and out.is_contiguous()
        assert torch.equal(out, torch.from_numpy(array).permute(2, 0, 1))


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "BMP"])
def test_other_formats_decode_like_pillow(fmt):
    data = encode(Image.fromarray(random_rgb(9, 11, seed=1)), fmt)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert torch.equal(decode_image(data), torch.from_numpy(expected.copy()).permute(2, 0, 1))


def test_grayscale_becomes_three_equal_channels():
    gray = random_rgb(6, 5, seed=2)[..., 0]
    out = decode_image(encode(Image.fromarray(gray, mode="L"), "PNG"))
    assert out.shape == (3, 6, 5)
    for c in range(3):
        assert torch.equal(out[c], torch.from_numpy(gray))


def test_rgba_drops_alpha():
    rgba = np.concatenate([random_rgb(4, 7, seed=3), np.full((4, 7, 1), 9, np.uint8)], axis=2)
    out = decode_image(encode(Image.fromarray(rgba, mode="RGBA"), "PNG"))
    assert torch.equal(out, torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1))


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    wide = np.random.default_rng(4).integers(0, 65536, (5, 6), dtype=np.uint16)
    out = decode_image(encode(Image.fromarray(wide), "PNG"))
    expected = torch.from_numpy(np.rint(wide / 257.0).astype(np.uint8))
    assert all(torch.equal(out[c], expected) for c in range(3))
    assert out.max() > 200  # Pillow's own convert("RGB") would have made most of this 255


def test_palette_and_cmyk_decode_to_rgb():
    rgb = Image.fromarray(random_rgb(8, 8, seed=5))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    out = decode_image(encode(palette, "PNG"))
    assert torch.equal(
        out, torch.from_numpy(np.asarray(palette.convert("RGBA"))[..., :3].copy()).permute(2, 0, 1)
    )
    cmyk = encode(rgb.convert("CMYK"), "JPEG")
    expected = np.asarray(Image.open(io.BytesIO(cmyk)).convert("RGB"))
    assert torch.equal(decode_image(cmyk), torch.from_numpy(expected.copy()).permute(2, 0, 1))


def test_exif_orientation_is_applied():
    array = random_rgb(2, 6, seed=6)
    img = Image.fromarray(array)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = decode_image(encode(img, "PNG", exif=exif))
    assert out.shape == (3, 6, 2)
    assert torch.equal(out, torch.from_numpy(np.rot90(array, k=-1).copy()).permute(2, 0, 1))


def test_corrupt_data_is_an_image_decode_error_naming_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"definitely not a jpeg")
    with pytest.raises(fastres.ImageDecodeError, match="broken.jpg"):
        decode_image(bad)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(encode(Image.fromarray(random_rgb(64, 64)), "JPEG")[:300])
    with pytest.raises(fastres.ImageDecodeError, match="truncated.jpg"):
        decode_image(truncated)
    assert issubclass(fastres.ImageDecodeError, fastres.InputError)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        decode_image(tmp_path / "nope.png")
    with pytest.raises(fastres.InputError, match="folder"):
        decode_image(tmp_path)


def test_missing_pillow_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `from PIL import ...` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'fastres\[images\]'"):
        decode_image(b"\x89PNG")


def test_find_images_recurses_sorted_and_filters_by_extension(tmp_path):
    for name in ["b.PNG", "a.jpg", "sub/c.jpeg", "sub/deeper/d.webp", "e.bmp", "notes.txt", ".hidden.jpg"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "f.jpg").write_bytes(b"x")
    found = find_images(tmp_path)
    names = [p.relative_to(tmp_path).as_posix() for p in found]
    assert names == ["a.jpg", "b.PNG", "e.bmp", "sub/c.jpeg", "sub/deeper/d.webp"]
    # an explicit file is taken as given; duplicates are listed once; order of arguments kept
    explicit = find_images([tmp_path / "notes.txt", tmp_path / "sub", tmp_path / "sub" / "c.jpeg"])
    assert [p.name for p in explicit] == ["notes.txt", "c.jpeg", "d.webp"]


def test_find_images_errors(tmp_path):
    with pytest.raises(fastres.InputError, match="no such file"):
        find_images([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(fastres.InputError, match="no images found"):
        find_images(tmp_path / "empty")
    with pytest.raises(fastres.InputError, match="no image paths"):
        find_images([])


def test_a_decode_bomb_is_refused_from_its_header(monkeypatch):
    import io

    from PIL import Image, ImageFile

    from fastres.errors import InputError
    from fastres.images import decode_image

    buf = io.BytesIO()
    Image.new("RGB", (300, 200), (40, 90, 200)).save(buf, format="PNG")
    data = buf.getvalue()
    assert decode_image(data, max_pixels=60_000).shape == (3, 200, 300)

    def never(self, *args, **kwargs):
        raise AssertionError("the image was decoded before its size was checked")

    monkeypatch.setattr(ImageFile.ImageFile, "load", never)
    refused = r"^<\d+ bytes of image data> is 300x200 \(60000 pixels\), over the limit"
    with pytest.raises(InputError, match=refused):
        decode_image(data, max_pixels=59_999)
