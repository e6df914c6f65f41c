"""Tests for llava_nb.images: every accepted input kind, every mode, and every failure path."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llava_nb import images
from llava_nb.errors import LlavaError
from llava_nb.images import ImageError, image_from_data_uri, image_to_data_uri, load_image

RED = (255, 0, 0)
WHITE = (255, 255, 255)


def png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 400
    return msg


@pytest.fixture
def red_png(tmp_path: Path) -> Path:
    path = tmp_path / "red.png"
    Image.new("RGB", (6, 4), RED).save(path)
    return path


# --- input kinds ---------------------------------------------------------------------------


def test_path_str_and_pathlike(red_png: Path) -> None:
    for src in (str(red_png), red_png):
        img = load_image(src)
        assert img.mode == "RGB" and img.size == (6, 4) and img.getpixel((0, 0)) == RED


def test_path_expands_home(red_png: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(red_png.parent))
    assert load_image("~/red.png").size == (6, 4)


def test_bytes_bytearray_memoryview(red_png: Path) -> None:
    data = red_png.read_bytes()
    for src in (data, bytearray(data), memoryview(data)):
        assert load_image(src).getpixel((1, 1)) == RED


def test_pil_image_is_copied_not_aliased() -> None:
    src = Image.new("RGB", (3, 3), RED)
    out = load_image(src)
    assert out is not src and out.getpixel((0, 0)) == RED


def test_data_uri_round_trip() -> None:
    uri = image_to_data_uri(Image.new("RGB", (5, 5), RED))
    assert uri.startswith("data:image/png;base64,")
    assert load_image(uri).getpixel((2, 2)) == RED
    assert image_from_data_uri(uri).size == (5, 5)
    jpeg = image_to_data_uri(Image.new("RGBA", (5, 5), (0, 0, 255, 255)), format="jpg")
    assert jpeg.startswith("data:image/jpeg;base64,") and load_image(jpeg).size == (5, 5)


def test_bad_data_uris() -> None:
    with pytest.raises(ImageError, match="not a base64 image URI"):
        load_image("data:text/plain;base64,aGVsbG8=")
    with pytest.raises(ImageError, match="broken base64"):
        image_from_data_uri("data:image/png;base64,@@@@")
    with pytest.raises(ImageError, match="not a readable image") as err:
        load_image("data:image/png;base64," + base64.b64encode(b"x" * 500).decode())
    assert len(one_line(err)) < 250  # the URI is shortened, not dumped


@pytest.mark.parametrize(
    ("arr", "expected"),
    [
        (np.full((4, 6), 255, np.uint8), WHITE),
        (np.full((4, 6, 1), 0, np.uint8), (0, 0, 0)),
        (np.tile(np.array(RED, np.uint8), (4, 6, 1)), RED),
        (np.tile(np.array([255, 0, 0, 0], np.uint8), (4, 6, 1)), WHITE),  # transparent
        (np.tile(np.array([1.0, 0.0, 0.0]), (4, 6, 1)), RED),
        (np.tile(np.array([1.02, -0.01, 0.0], np.float32), (4, 6, 1)), RED),  # clipped
        (np.tile(np.array([255.0, 0.0, 0.0]), (4, 6, 1)), RED),  # uint8 values made float
        (np.ones((4, 6), bool), WHITE),
        (np.full((4, 6), 255, np.int64), WHITE),
    ],
)
def test_numpy_arrays(arr: np.ndarray, expected: tuple[int, int, int]) -> None:
    img = load_image(arr)
    assert img.mode == "RGB" and img.size == (6, 4) and img.getpixel((0, 0)) == expected


@pytest.mark.parametrize("shape", [(4,), (2, 4, 6, 3), (4, 6, 2), (4, 6, 5)])
def test_numpy_bad_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ImageError, match="HxW, HxWx1, HxWx3 or HxWx4") as err:
        load_image(np.zeros(shape, np.uint8))
    one_line(err)


def test_float_pixels_read_alike_as_arrays_and_as_mode_f() -> None:
    values = np.full((4, 6), 1.2, np.float32)  # in 0-1, a little over
    assert load_image(values).getpixel((0, 0)) == WHITE
    assert load_image(Image.fromarray(values, mode="F")).getpixel((0, 0)) == WHITE


def test_numpy_bad_values_and_empty() -> None:
    with pytest.raises(ImageError, match="dtype int64"):
        load_image(np.full((4, 6), 1000, np.int64))
    for low, high in ((-1.8, 2.1), (0.0, 1000.0)):  # normalized; not pixels either way
        with pytest.raises(ImageError, match=f"values from {low:g} to {high:g}, not pixels"):
            load_image(np.array([[low, high]], np.float32))
    with pytest.raises(ImageError, match="empty"):
        load_image(np.zeros((0, 6, 3), np.uint8))


@pytest.mark.parametrize(
    "tensor",
    [
        torch.zeros(3, 4, 6).index_fill_(0, torch.tensor([0]), 1.0),  # CxHxW float
        torch.zeros(4, 6, 3, dtype=torch.uint8).index_fill_(2, torch.tensor([0]), 255),  # HWC
        torch.zeros(4, 4, 6).index_fill_(0, torch.tensor([0, 3]), 1.0),  # CxHxW RGBA
        torch.zeros(3, 4, 6, dtype=torch.bfloat16).index_fill_(0, torch.tensor([0]), 1.0),
        torch.zeros(3, 4, 6, requires_grad=True).index_fill(0, torch.tensor([0]), 1.0),
    ],
)
def test_torch_tensors(tensor: torch.Tensor) -> None:
    img = load_image(tensor)
    assert img.size == (6, 4) and img.getpixel((5, 3)) == RED


@pytest.mark.parametrize("tensor", [torch.empty(4, 6, 3, device="meta"), torch.eye(6).to_sparse()])
def test_torch_tensors_without_readable_values(tensor: torch.Tensor) -> None:
    with pytest.raises(ImageError, match="cannot read the values of the tensor .*dense") as err:
        load_image(tensor)
    one_line(err)


def test_torch_gray_and_bad_shape() -> None:
    assert load_image(torch.ones(1, 4, 6)).getpixel((0, 0)) == WHITE
    assert load_image(torch.ones(4, 6)).size == (6, 4)
    with pytest.raises(ImageError, match="or CxHxW"):
        load_image(torch.zeros(2, 3, 4, 6))


def test_namespace_lookup(red_png: Path) -> None:
    ns = {"cat": str(red_png), "arr": np.zeros((2, 2), np.uint8), "bad": 42}
    assert load_image("cat", namespace=ns).size == (6, 4)
    assert load_image("arr", namespace=ns).size == (2, 2)
    with pytest.raises(
        ImageError, match=r"^variable 'bad': cannot load an image from type int \(42\)"
    ):
        load_image("bad", namespace=ns)
    with pytest.raises(ImageError, match="^no notebook variable or image file named 'dog'"):
        load_image("dog", namespace=ns)  # not a variable, nor a file
    with pytest.raises(ImageError, match="image file 'dog' not found; check the path"):
        load_image("dog")  # no notebook: a path


@pytest.mark.parametrize("value", [42, {"a": 1}, None, 3.5, object()])
def test_unsupported_types(value: object) -> None:
    with pytest.raises(ImageError, match=r"cannot load an image from type .*; pass a path") as err:
        load_image(value)
    assert type(value).__name__ in one_line(err)


def test_image_error_is_llava_error() -> None:
    assert issubclass(ImageError, LlavaError)


# --- processing ----------------------------------------------------------------------------


def test_exif_orientation_is_applied_to_files_not_to_pil_images(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), RED)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    assert load_image(path).size == load_image(path.read_bytes()).size == (20, 40)
    with Image.open(path) as raw:  # as the notebook shows it, turned or not by its owner
        assert raw.size == load_image(raw).size == (40, 20)
        upright = raw.transpose(Image.Transpose.ROTATE_270)  # keeps the EXIF tag
        assert load_image(upright).size == (20, 40)


def test_thin_images_are_refused() -> None:
    assert load_image(Image.new("RGB", (1, 100))).size == (1, 100)
    with pytest.raises(ImageError, match="is 1x101, one side over 100 times the other; crop"):
        load_image(np.zeros((101, 1), np.uint8))


def test_rgba_transparency_on_white() -> None:
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0, 255))
    out = load_image(png_bytes(img))
    assert out.getpixel((0, 0)) == RED and out.getpixel((3, 3)) == WHITE
    half = load_image(Image.new("LA", (2, 2), (0, 128)))
    assert half.getpixel((0, 0)) == (127, 127, 127)


def test_palette_with_transparency() -> None:
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((0, 0), 0)
    out = load_image(png_bytes(img, transparency=0))
    assert out.getpixel((0, 0)) == WHITE and out.getpixel((1, 1)) == RED
    assert load_image(png_bytes(img)).getpixel((0, 0)) == (0, 0, 0)  # opaque palette


def test_sixteen_bit_and_wide_modes() -> None:
    arr16 = np.full((4, 6), 65535, np.uint16)
    arr16[0, 0] = 0
    out = load_image(png_bytes(Image.fromarray(arr16)))
    assert out.getpixel((1, 1)) == WHITE and out.getpixel((0, 0)) == (0, 0, 0)
    assert load_image(Image.fromarray(np.full((2, 2), 0.5, np.float32))).getpixel((0, 0)) == (
        128,
        128,
        128,
    )
    assert load_image(Image.new("I", (2, 2), 65535)).getpixel((0, 0)) == WHITE


def test_sixteen_bit_arrays_read_as_sixteen_bit_images_do() -> None:
    """A uint16 array was refused (and one with values up to 255 read as 8-bit) while the
    same pixels as a 16-bit PIL image were scaled to 8 bits: they now read alike, whatever
    the values, the byte order, the channels or the container (numpy, torch)."""
    gray = np.random.default_rng(0).integers(0, 65536, (300, 7), dtype=np.uint16)  # 300: row bands
    gray[0, :3] = (0, 200, 65535)  # 200 of 65535 is near black, not 200 of 255
    as_pil = load_image(Image.fromarray(gray))
    assert as_pil.getpixel((1, 0)) == (1, 1, 1) and as_pil.getpixel((2, 0)) == WHITE
    for arr in (gray, gray[..., None], gray.astype(">u2"), torch.from_numpy(gray[None] * 1)):
        assert load_image(arr).tobytes() == as_pil.tobytes()
    rgb = np.stack([gray, 65535 - gray, gray // 2], axis=-1)
    channels = [load_image(Image.fromarray(c)).getchannel("R") for c in np.moveaxis(rgb, -1, 0)]
    assert load_image(rgb).tobytes() == Image.merge("RGB", channels).tobytes()


@pytest.mark.parametrize(
    "arr",
    [np.full((4, 6), 1000, np.int64), np.full((4, 6), 70000, np.uint32), np.zeros((4, 6), complex)],
)
def test_other_dtypes_are_refused_naming_the_accepted_ones(arr: np.ndarray) -> None:
    accepted = r"use uint8 \(0-255\), uint16 \(0-65535\), float \(0-1 or 0-255\) or bool$"
    with pytest.raises(ImageError, match=f"has dtype {arr.dtype}.*; {accepted}") as err:
        load_image(arr)
    one_line(err)


@pytest.mark.parametrize(
    "fmt", ["PNG", "JPEG", "WEBP", "GIF", "TIFF", "BMP", "ICO", "PPM", "TGA", "JPEG2000", "DDS",
            "SGI", "QOI", "MPO"],
)  # fmt: skip
def test_every_format_pillow_writes_loads(photo: Image.Image, fmt: str) -> None:
    """QOI and DDS are decoded in Python, a read per pixel: not a file of crafted chunks."""
    out = load_image(png_bytes(photo.resize((128, 150)), fmt))
    assert out.mode == "RGB" and (fmt == "ICO" or out.size == (128, 150))  # ICO: its sizes


@pytest.mark.parametrize("fmt", ["QOI", "DDS"])
def test_a_large_image_in_a_format_pillow_decodes_in_python_is_refused(fmt: str) -> None:
    """Pillow decodes these a pixel at a time in Python: a 4 MP photo as DDS took 10 s, the
    64 MP allowed would take minutes of a frozen notebook."""
    start = time.monotonic()
    with pytest.raises(ImageError, match=f"is a {fmt} image of 2001x2000, .*convert it to PNG"):
        load_image(png_bytes(Image.new("RGB", (2001, 2000), RED), fmt))
    assert time.monotonic() - start < 3
    assert load_image(png_bytes(Image.new("RGB", (200, 100), RED), fmt)).size == (200, 100)


MODES = ["1", "L", "LA", "La", "P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
         "I", "F", "I;16", "I;16B", "I;16L", "I;16N"]  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_becomes_rgb(mode: str) -> None:
    assert load_image(Image.new(mode, (3, 2))).mode == "RGB"


# --- failures ------------------------------------------------------------------------------


def test_devices_pipes_and_huge_files_are_refused_unread(tmp_path: Path) -> None:
    import os

    os.mkfifo(tmp_path / "pipe")  # opening it would wait for a writer forever
    for special in ("/dev/zero", tmp_path / "pipe"):  # /dev/zero was read until memory ran out
        with pytest.raises(ImageError, match="is not a regular file .a device or pipe.; pass an"):
            load_image(special)
    with open(tmp_path / "huge.png", "wb") as f:
        f.truncate(600 * 2**20)  # sparse: no disk used
    with pytest.raises(ImageError, match="is 600 MB, more than an image of 64 megapixels takes"):
        load_image(tmp_path / "huge.png")


def test_missing_file_and_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ImageError, match=r"image file 'cat\.jpg' not found; check the path") as err:
        load_image("cat.jpg")
    assert str(tmp_path) in one_line(err)
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)
    for empty in ("", "  "):
        with pytest.raises(ImageError, match="the image name is empty; pass a path"):
            load_image(empty)
    with pytest.raises(ImageError, match=r"cannot be read \(embedded null byte\); check the path"):
        load_image("cat\0.jpg")


def test_long_input_is_shortened(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as err:
        load_image(str(tmp_path / ("x" * 300)))
    assert len(one_line(err)) < 300


def test_truncated_jpeg(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = png_bytes(Image.fromarray(noise), "JPEG", quality=95)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ImageError, match=r"'.*cut\.jpg' is not a readable image .*truncated"
    ) as err:
        load_image(path)
    one_line(err)


def test_text_file_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("not an image\n" * 50)
    with pytest.raises(ImageError, match=r"is not a readable image \(unknown image format\)"):
        load_image(path)
    with pytest.raises(ImageError, match=r"image bytes \(13 bytes\) is not a readable"):
        load_image(b"not an image\n")


def test_pixel_limit(red_png: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "MAX_PIXELS", 10)
    with pytest.raises(ImageError, match="is 6x4, more than 10 pixels; downscale it first"):
        load_image(red_png)
    with pytest.raises(ImageError, match="more than 10 pixels"):
        load_image(np.zeros((4, 6), np.uint8))


def test_decompression_bomb_header() -> None:
    data = bytearray(png_bytes(Image.new("L", (1, 1))))
    ihdr = struct.pack(">II", 100_000, 100_000) + bytes(data[24:29])  # claims 10^10 pixels
    data[16:33] = ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    with pytest.raises(ImageError, match="more than 64,000,000 pixels"):
        load_image(bytes(data))


def test_other_url_schemes_refused(red_png: Path) -> None:
    for url in (red_png.as_uri(), "ftp://example.com/cat.png"):
        with pytest.raises(ImageError, match="only http\\(s\\) URLs"):
            load_image(url)


# --- URLs, against a real local HTTP server ----------------------------------------------


class Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/slow":
            time.sleep(2)
        if self.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
            return
        if self.path == "/trickle":  # a byte every 0.1 s, until the client hangs up
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
            return
        if self.path == "/cut":  # announces 1000 bytes, sends 20, hangs up
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(png_bytes(Image.new("RGB", (6, 4), RED))[:20])
            return
        if self.headers.get("User-Agent", "").startswith("Python-urllib"):
            self.send_error(403, "default user agent")
            return
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


class QuietServer(http.server.ThreadingHTTPServer):
    """Joins its handler threads on close and keeps a client's hang-up off stderr, so a
    late write to a timed-out client cannot leak a traceback into a later test's output."""

    daemon_threads = False

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    Image.new("RGB", (6, 4), RED).save(tmp_path / "red.png")
    (tmp_path / "slow").write_bytes((tmp_path / "red.png").read_bytes())
    httpd = QuietServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(tmp_path)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_url_success(server: str) -> None:
    img = load_image(f"{server}/red.png")
    assert img.size == (6, 4) and img.getpixel((0, 0)) == RED


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/nope.png", r"cannot fetch '.*/nope.png' \(HTTP 404"),
        ("/loop", r"\(HTTP 302 The HTTP server returned a redirect"),  # a three-line reason
    ],
)
def test_url_refused_in_one_line(server: str, path: str, why: str) -> None:
    with pytest.raises(ImageError, match=why) as err:
        load_image(server + path)
    one_line(err)


def test_a_web_page_url_names_the_fix(server: str, tmp_path: Path) -> None:
    """A page that shows the image (a photo site's, say) said "unknown image format; pass a
    complete PNG/JPEG/WebP/GIF file", as if the image were broken."""
    page = "<!doctype html><html><head><title>Cat</title></head><body><img src=cat.jpg>"
    (tmp_path / "cat.html").write_text(page)
    with pytest.raises(ImageError, match=r"cat\.html' is a web page, not an image; use the addr"):
        load_image(f"{server}/cat.html")


def test_a_download_cut_short_says_so(server: str) -> None:
    """The server hung up after 20 of its 1000 bytes: this said "not a readable image"."""
    with pytest.raises(
        ImageError, match=r"closed the connection after 20 of 1,000 bytes; try"
    ) as err:
        load_image(f"{server}/cut")
    one_line(err)


def test_url_too_large(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 20)
    with pytest.raises(ImageError, match="is over 20 bytes"):
        load_image(f"{server}/red.png")


def test_url_connection_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ImageError, match=f"cannot fetch 'http://127.0.0.1:{port}/x.png'"):
        load_image(f"http://127.0.0.1:{port}/x.png")


@pytest.mark.parametrize(
    ("limit", "seconds", "path", "why"),
    [
        ("FETCH_TIMEOUT_S", 0.5, "/slow", r"timed out after 0.5 s"),  # silent
        ("FETCH_DEADLINE_S", 1, "/trickle", r"sent \d+ bytes in 1 s and was still sending"),
    ],
)
def test_url_that_is_too_slow_is_given_up_on(
    server: str, monkeypatch: pytest.MonkeyPatch, limit: str, seconds: float, path: str, why: str
) -> None:
    monkeypatch.setattr(images, limit, seconds)
    start = time.monotonic()
    with pytest.raises(ImageError, match=why):
        load_image(server + path)
    assert time.monotonic() - start < seconds + 1


# --- import cost ---------------------------------------------------------------------------


def test_import_is_cheap() -> None:
    code = (
        "import llava_nb.images, sys; "
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


# --- crafted files ---------------------------------------------------------------------------


def test_sixteen_bit_pixels_are_scaled_without_float64_copies() -> None:
    """A 64-megapixel 16-bit PNG (124 KB of zeros) took 1.7 GB and 5 s in float64 copies."""
    import tracemalloc

    gray16 = Image.fromarray(np.full((1000, 1000), 40000, np.uint16))
    tracemalloc.start()
    try:
        out = load_image(gray16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.getpixel((0, 0)) == (156, 156, 156)  # 40000 / 257, rounded
    assert peak < 12 * 1000 * 1000  # bytes per pixel; float64 copies took 24


def test_postscript_is_refused_without_running_ghostscript(tmp_path: Path) -> None:
    """Pillow reads EPS by running Ghostscript on the file: a server given a data URI
    would run it on a stranger's PostScript."""
    from PIL import EpsImagePlugin

    ran = tmp_path / "ghostscript-ran"
    fake_gs = tmp_path / "gs"
    fake_gs.write_text(f"#!/bin/sh\ntouch {ran}\nexit 1\n")
    fake_gs.chmod(0o755)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    (tmp_path / "drawing.eps").write_bytes(eps)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(EpsImagePlugin, "gs_binary", str(fake_gs))
        for source in (eps, tmp_path / "drawing.eps"):
            with pytest.raises(ImageError, match=r"is PostScript \(EPS\), .*; convert it to PNG"):
                load_image(source)
    assert not ran.exists()


def test_a_broken_or_closed_pil_image_names_the_right_fix(tmp_path: Path) -> None:
    """A PIL image opened lazily from a cut file, or closed, cannot be converted either:
    telling the user to convert it was a dead end."""
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = png_bytes(Image.fromarray(noise))
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    cut = Image.open(tmp_path / "cut.png")
    with pytest.raises(ImageError, match=r"truncated.*; pass a complete PNG") as err:
        load_image(cut)
    assert "convert" not in one_line(err)
    closed = Image.open(io.BytesIO(data))
    closed.close()
    with pytest.raises(ImageError, match=r"\(Operation on closed image\); open it again") as err:
        load_image(closed)
    assert "convert" not in one_line(err)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("header_only", r"unknown image format"),  # a PNG signature and IHDR, nothing more
        ("idat_cut", r"truncated"),  # 3000x3000 announced, half its pixel data
        ("idat_garbage", r"broken data stream"),
        ("no_idat", r"cannot load this image"),
        ("bomb_20000", r"more than 64,000,000 pixels"),  # 58 bytes announcing 400 MP
        ("bomb_65535x1", r"65535x1, one side over 100 times the other"),
    ],
)
def test_crafted_pngs_are_refused_in_one_line(
    server: str, tmp_path: Path, name: str, why: str
) -> None:
    """Each way in (bytes, a path, a URL: the server serves tmp_path) gives the same refusal."""
    data = crafted_png(name)
    (tmp_path / f"{name}.png").write_bytes(data)
    for source in (data, tmp_path / f"{name}.png", f"{server}/{name}.png"):
        with pytest.raises(ImageError, match=why) as err:
            load_image(source)
        one_line(err)


def chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: its length, kind, data and CRC."""
    crc = struct.pack(">I", zlib.crc32(kind + data))
    return struct.pack(">I", len(data)) + kind + data + crc


def png(width: int, height: int, *chunks: bytes) -> bytes:
    """An 8-bit RGB PNG of these chunks, its header (IHDR) saying `width` x `height`."""
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + b"".join(chunks) + chunk(b"IEND", b"")


def crafted_png(name: str) -> bytes:

    if name == "header_only":
        return png(8000, 8000)[:33]
    if name == "idat_cut":
        pixels = zlib.compress(bytes((1 + 3 * 3000) * 3000), 9)
        return png(3000, 3000, chunk(b"IDAT", pixels[: len(pixels) // 2]))
    if name == "idat_garbage":
        return png(100, 100, chunk(b"IDAT", b"garbage"))
    if name == "no_idat":
        return png(100, 100)
    sizes = {"bomb_20000": (20000, 20000), "bomb_10000": (10000, 10000), "bomb_65535x1": (65535, 1)}
    width, height = sizes[name]
    return png(width, height, chunk(b"IDAT", b"x"))


def test_a_huge_image_is_refused_in_our_one_line_without_pillows_warning() -> None:
    """89-178 MP: Pillow warned "could be decompression bomb DOS attack" before our refusal."""
    import warnings

    data = crafted_png("bomb_10000")  # 100 MP announced
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageError, match=r"is 10000x10000, more than 64,000,000 pixels"):
            load_image(data)
    assert [str(w.message) for w in caught] == []


def jpeg_photo(mode: str = "RGB") -> bytes:
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return f.read() if mode == "RGB" else png_bytes(Image.open(f).convert(mode), "JPEG")


def tall_header(data: bytes) -> bytes:
    """The photo with its header (SOF0) claiming four times its rows."""
    sof = data.index(b"\xff\xc0")
    (height,) = struct.unpack(">H", data[sof + 5 : sof + 7])
    return data[: sof + 5] + struct.pack(">H", height * 4) + data[sof + 7 :]


@pytest.mark.parametrize(
    "damaged",
    [
        lambda: jpeg_photo()[:30_000] + b"\xff\xd9",  # cut, its end marker put back
        lambda: tall_header(jpeg_photo()),  # a header that claims more rows than the data holds
        lambda: jpeg_photo("CMYK")[:30_000] + b"\xff\xd9",  # the rest showed dark gray
        lambda: jpeg_photo("L")[:20_000] + b"\xff\xd9",
    ],
    ids=["cut", "tall_header", "cmyk_cut", "gray_cut"],
)
def test_a_jpeg_whose_data_ends_early_is_refused_as_truncated(tmp_path: Path, damaged) -> None:
    """Pillow decoded these without an error, the missing part filled with flat gray: the
    model was asked about a photo half gone."""
    (tmp_path / "photo.jpg").write_bytes(damaged())
    for source in (tmp_path / "photo.jpg", damaged()):
        with pytest.raises(ImageError, match=r"is truncated \(its data ends before its last"):
            load_image(source)


def test_a_complete_jpeg_ending_in_flat_gray_still_loads() -> None:
    """Flat gray 128 is also what libjpeg fills a cut file with: a letterboxed photo has it."""
    boxed = Image.new("RGB", (512, 800), (128, 128, 128))
    with Image.open(io.BytesIO(jpeg_photo())) as photo:
        boxed.paste(photo, (0, 100))
    for data in (png_bytes(boxed, "JPEG"), png_bytes(boxed.convert("CMYK"), "JPEG")):
        out = load_image(data)
        assert out.size == (512, 800) and out.getpixel((511, 799)) in ((128,) * 3, (64,) * 3)


def many_chunks(kind: str, count: int) -> bytes:
    """A tiny image made of `count` empty chunks (PNG), markers (JPEG) or comments (GIF)."""
    if kind == "png":
        data = png_bytes(Image.new("RGB", (8, 8), RED))
        return data[:33] + chunk(b"abCd", b"") * count + data[33:]  # after the header
    if kind == "jpeg":
        data = png_bytes(Image.new("RGB", (8, 8), RED), "JPEG")
        return data[:2] + b"\xff\xfe\x00\x03x" * count + data[2:]
    data = png_bytes(Image.new("RGB", (8, 8), RED), "GIF")
    start = data.index(b"\x2c")  # the image descriptor
    return data[:start] + b"\x21\xfe\x01x\x00" * count + data[start:]


@pytest.mark.parametrize("kind", ["png", "jpeg", "gif"])
def test_a_file_of_a_million_tiny_chunks_is_refused_quickly(kind: str) -> None:
    """Pillow reads chunks and markers one at a time: 12 MB of empty PNG chunks took 5 s,
    5 MB of JPEG markers 5.5 s, and a 512 MB file would take minutes."""
    data = many_chunks(kind, 1_000_000)
    start = time.monotonic()
    with pytest.raises(ImageError, match=r"is split into over 100,000 chunks or markers") as err:
        load_image(data)
    assert time.monotonic() - start < 3
    one_line(err)
    assert load_image(many_chunks(kind, 1000)).getpixel((0, 0))[0] > 250  # a few: fine


def test_a_png_of_one_data_chunk_per_row_still_loads() -> None:
    """Some encoders write each row in its own chunk: many chunks, yet a real image."""
    rows = zlib.compressobj()
    row = b"\0" + bytes(RED) * 800  # filter type 0, then the pixels
    parts = [rows.compress(row) + rows.flush(zlib.Z_SYNC_FLUSH) for _ in range(8000)]
    out = load_image(png(800, 8000, *(chunk(b"IDAT", part) for part in [*parts, rows.flush()])))
    assert out.size == (800, 8000) and out.getpixel((799, 7999)) == RED


# --- header only -----------------------------------------------------------------------------

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
REFUSED_FROM_THE_HEADER = {
    "eps": lambda: EPS,
    "dos_eps": lambda: b"\xc5\xd0\xd3\xc6" + bytes(26),
    "bomb_20000": lambda: crafted_png("bomb_20000"),
    "bomb_10000": lambda: crafted_png("bomb_10000"),
    "thin": lambda: crafted_png("bomb_65535x1"),
    "thin_101": lambda: png_bytes(Image.new("RGB", (1010, 10))),
    "zero_size": lambda: b"P6 0 0 255\n",
    "unknown": lambda: crafted_png("header_only"),
    "text": lambda: b"not an image\n",
    "slow_qoi": lambda: png_bytes(Image.new("RGB", (2001, 2000), RED), "QOI"),
    "chunks": lambda: many_chunks("png", 1_000_000),
}


@pytest.mark.parametrize("name", REFUSED_FROM_THE_HEADER)
def test_image_header_refuses_what_a_load_refuses_in_the_same_words(name: str) -> None:
    """The server checks a queued request's images from their headers: each refusal a load
    makes before decoding must come from the header alone, word for word (bytes and URIs)."""
    data = REFUSED_FROM_THE_HEADER[name]()
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    for source in (data, uri):
        with pytest.raises(ImageError) as loaded:
            load_image(source)
        with pytest.raises(ImageError) as header:
            images.image_header(source)
        assert one_line(header) == one_line(loaded)


def test_image_header_reads_the_size_without_decoding() -> None:
    photo = png_bytes(Image.new("RGB", (300, 200), RED), "JPEG")
    uri = image_to_data_uri(Image.new("RGB", (30, 20), RED))
    assert images.image_header(photo) == images.image_header(bytearray(photo)) == (300, 200)
    assert images.image_header(uri) == (30, 20)
    assert images.image_header(crafted_png("idat_garbage")) == (100, 100)  # pixels unread
    for uri, why in (("data:text/plain;base64,aGk=", "not a base64 image URI"),
                     ("data:image/png;base64,a$b", "has broken base64")):  # fmt: skip
        with pytest.raises(ImageError, match=why):
            images.image_header(uri)
    with pytest.raises(ImageError, match=r"^upload \(3 bytes\) is not a readable image"):
        images.image_header(b"abc", "upload (3 bytes)")
