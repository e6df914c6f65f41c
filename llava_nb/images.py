"""Turn whatever image a notebook user holds into the RGB PIL image LLaVA processors expect.

Users have paths, URLs, bytes, data URIs, PIL images, numpy arrays, torch tensors, or just the
name of a variable. ``load_image`` accepts all of them and fails with one-line messages that
name the input and the fix, never a PIL traceback or a screenful of bytes.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import http.client
import io
import math
import os
import re
import stat
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from llava_nb.errors import LlavaError, first_line

MAX_PIXELS = 64_000_000  # far above any vision tower's input; refuses decompression bombs
MAX_ASPECT = 100  # processors scale the short side up to the tower's size: 1x5000 px took 6 GB
MAX_IMAGE_BYTES = 50 * 1024 * 1024  # cap on downloaded bytes
MAX_FILE_BYTES = 512 * 1024 * 1024  # cap on a local file: 64 MP at 16 bits x 4 channels, raw
FLOAT_ONE_AT_MOST = 2  # float pixels up to this are in 0-1 (a little over: clipped), else 0-255
SIXTEEN_TO_EIGHT = 257  # 65535 / 255: a 16-bit pixel (PNG, TIFF, uint16 array) to 8 bits
ARRAY_DTYPES = "uint8 (0-255), uint16 (0-65535), float (0-1 or 0-255) or bool"
FETCH_TIMEOUT_S = 10  # seconds, so a dead server cannot hang a notebook cell
FETCH_DEADLINE_S = 60  # for the whole download: a server trickling bytes cannot hang it either
POSTSCRIPT = (b"%!PS", b"\xc5\xd0\xd3\xc6")  # EPS, plain and in DOS binary: Pillow's marks
MAX_READS = 100_000  # Pillow reads chunks/markers one by one: 1M empty PNG chunks took 5 s; a
# real image takes far fewer (3 per chunk: libpng's 8 KB IDATs of a 100 MB PNG, 37,000)
SLOW_FORMAT_PIXELS = 4_000_000  # QOI, DDS, BMP RLE: Pillow decodes them in Python, 2-3 s/MP
JPEG_END = b"\xff\xd9"  # EOI: a cut JPEG with this appended decodes without an error
JPEG_FILL = {128, 127}  # what libjpeg puts where data is missing: gray (127: Adobe CMYK, inverted)
USER_AGENT = "llava_nb (Python urllib)"  # some hosts refuse the default one
ACCEPTED = (
    "a path, an http(s) URL, a data:image URI, bytes, a PIL image, a numpy array, "
    "a torch tensor, or the name of a notebook variable holding one"
)


class ImageError(LlavaError):
    """An image could not be loaded; the message names the input and the fix."""


def _cut(text: str, limit: int = 80) -> str:
    """Cut ``text`` to ``limit`` chars, so no message dumps a whole input."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(text: str) -> str:
    return repr(_cut(text))


def _unreadable(label: str, err: Exception) -> str:
    why = "unknown image format" if isinstance(err, UnidentifiedImageError) else first_line(err, 80)
    closed = "closed image" in why  # a PIL image after its .close()
    fix = "open it again" if closed else "pass a complete PNG/JPEG/WebP/GIF file"
    return f"{label} is not a readable image ({why}); {fix}"


def _too_big(label: str, size: str = "") -> ImageError:
    return ImageError(f"{label} is {size}more than {MAX_PIXELS:,} pixels; downscale it first")


def load_image(source: object, *, namespace: Mapping[str, object] | None = None) -> Image.Image:
    """Load ``source`` (see ``ACCEPTED``) as an upright RGB image, transparency on white."""
    if isinstance(source, str) and source.isidentifier() and source in (namespace or {}):
        try:
            return load_image(namespace[source])
        except ImageError as err:
            raise ImageError(f"variable {source!r}: {err}") from err
    if isinstance(source, Image.Image):  # as the notebook shows it: no EXIF rotation
        label = f"PIL image (mode {source.mode}, {source.width}x{source.height})"
        return _finish(source, label)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return decode_image(data, f"image bytes ({len(data):,} bytes)")
    if isinstance(source, str) and source[:5].lower() == "data:":
        return image_from_data_uri(source)
    if isinstance(source, str) and re.match(r"(?i)https?://", source):
        return decode_image(_fetch(source), f"image at {_short(source)}")
    if isinstance(source, str) and re.match(r"(?i)([a-z][\w+.-]+://|file:)", source):
        raise ImageError(f"cannot load {_short(source)}: only http(s) URLs are fetched; use a path")
    if isinstance(source, str) and not source.strip():
        raise ImageError("the image name is empty; pass a path, an http(s) URL or a variable name")
    named = isinstance(source, str) and source.isidentifier() and namespace is not None
    if named and not Path(source).exists():  # a name, not a path: say both were looked for
        raise ImageError(f"no notebook variable or image file named {source!r}; check the name")
    if isinstance(source, (str, os.PathLike)):
        return decode_image(*_read_file(source))
    np = sys.modules.get("numpy")  # an ndarray implies numpy is imported already
    if np is not None and isinstance(source, np.ndarray):
        return _from_array(source, f"array of shape {source.shape}", torch=False)
    if type(source).__module__.startswith("torch") and hasattr(source, "detach"):
        label = f"tensor of shape {tuple(source.shape)}"
        try:
            tensor = source.detach().cpu()
            tensor = tensor.float() if tensor.is_floating_point() else tensor  # bfloat16 -> numpy
            values = tensor.numpy()
        except (RuntimeError, TypeError, NotImplementedError) as err:  # meta, sparse, ...
            raise ImageError(
                f"cannot read the values of the {label} ({first_line(err, 80)}); pass a dense "
                "tensor that holds data"
            ) from None
        return _from_array(values, label, torch=True)
    kind, mod = type(source).__qualname__, type(source).__module__
    kind = kind if mod == "builtins" else f"{mod}.{kind}"
    raise ImageError(
        f"cannot load an image from type {kind} ({_cut(repr(source))}); pass {ACCEPTED}"
    )


def _read_file(source: str | os.PathLike) -> tuple[bytes, str]:
    label = f"image file {_short(os.fspath(source))}"
    path = Path(source).expanduser()
    try:
        info = path.stat()  # before opening: opening a pipe would wait for a writer
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError
        if not stat.S_ISREG(info.st_mode):  # /dev/zero was read until memory ran out
            raise ImageError(
                f"{label} is not a regular file (a device or pipe); pass an image file"
            )
        if info.st_size > MAX_FILE_BYTES:
            raise ImageError(
                f"{label} is {info.st_size / 2**20:,.0f} MB, more than an image of "
                f"{MAX_PIXELS / 1e6:.0f} megapixels takes; pass an image file"
            )
        return path.read_bytes(), label
    except FileNotFoundError:
        raise ImageError(
            f"{label} not found; check the path (relative paths start at {os.getcwd()})"
        ) from None
    except IsADirectoryError:
        raise ImageError(f"{label} is a directory; pass an image file inside it") from None
    except (OSError, ValueError) as err:  # ValueError: a NUL in the path
        raise ImageError(f"{label} cannot be read ({first_line(err, 80)}); check the path") from err


def _fetch(url: str) -> bytes:
    """GET ``url`` with a timeout and a byte cap, so a bad server cannot hang or flood us."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    deadline = time.monotonic() + FETCH_DEADLINE_S
    chunks, size = [], 0
    try:
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as response:
            while size <= MAX_IMAGE_BYTES and (chunk := response.read1(1 << 16)):
                chunks.append(chunk)
                size += len(chunk)
                if time.monotonic() > deadline:
                    raise ImageError(
                        f"{_short(url)} sent {size:,} bytes in {FETCH_DEADLINE_S} s and was "
                        "still sending; download the image first, or use a faster server"
                    )
            missing = response.length or 0  # what its Content-Length announced and never came
            kind = response.headers.get_content_type()
    except (OSError, http.client.HTTPException, ValueError) as err:
        if isinstance(err, urllib.error.HTTPError):
            why = f"HTTP {err.code} {first_line(err.reason, 80)}"
            err.close()
        else:
            reason = getattr(err, "reason", err)  # URLError wraps the socket error
            timed_out = isinstance(reason, TimeoutError) or "timed out" in str(reason)
            why = f"timed out after {FETCH_TIMEOUT_S} s" if timed_out else first_line(reason, 80)
        raise ImageError(f"cannot fetch {_short(url)} ({why}); check the URL and network") from err
    if size > MAX_IMAGE_BYTES:
        raise ImageError(f"image at {_short(url)} is over {MAX_IMAGE_BYTES:,} bytes; shrink it")
    if missing:
        raise ImageError(
            f"{_short(url)} closed the connection after {size:,} of {size + missing:,} bytes; "
            "try again"
        )
    data = b"".join(chunks)
    if kind == "text/html" and data.lstrip()[:1] == b"<":  # a page showing the image, say
        raise ImageError(
            f"{_short(url)} is a web page, not an image; use the address of the image itself "
            "(right-click it: Copy Image Address)"
        )
    return data


class _TooManyReads(Exception):
    """Raised from inside Pillow, which lets it through (it retries other formats on a few
    exception types, and wraps OSError)."""


class _Budgeted(io.BytesIO):
    """Bytes that Pillow may read only MAX_READS times: it parses chunks and markers one read
    at a time, in Python, so a 12 MB PNG of a million empty chunks took 5 s (a 512 MB one,
    minutes); pixel data it reads 64 KB at a time."""

    reads_left = MAX_READS

    def read(self, size: int | None = -1) -> bytes:
        self.reads_left -= 1
        if self.reads_left < 0:
            raise _TooManyReads
        return super().read(size)


def image_header(data: bytes | str, label: str | None = None) -> tuple[int, int]:
    """Width and height of an encoded image (bytes, or a data:image URI), from its header:
    every check a load makes before decoding pixels (PostScript, the pixel limit, the shape,
    slow formats, crafted chunks), with the ImageError a load would raise; not a cut or broken
    pixel stream, which only decoding finds. ``label`` names it in errors (default: as a load)."""
    if isinstance(data, str):
        data, uri_label = data_uri_bytes(data)
        label = label or uri_label
    else:
        data = bytes(data)
        label = label or f"image bytes ({len(data):,} bytes)"
    with _refusals(label), _header(data, label) as img:
        return img.size


def decode_image(data: bytes, label: str) -> Image.Image:
    """An image file's bytes as an RGB image, every limit checked; `label` names it in errors."""
    with _refusals(label):
        img = _header(data, label)
        out = _pixels(img, label, upright=True)
    if img.format == "JPEG" and _jpeg_cut_short(img, data):
        raise ImageError(
            f"{label} is truncated (its data ends before its last rows, which would show gray); "
            "pass the complete JPEG file"
        )
    return out


@contextlib.contextmanager
def _refusals(label: str) -> Iterator[None]:
    """Turn what Pillow raises on a file (and our read budget) into one-line ImageErrors."""
    try:
        yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise _too_big(label) from err  # the warning: where warnings are made errors
    except _TooManyReads:
        raise ImageError(
            f"{label} is split into over {MAX_READS:,} chunks or markers, far more than an "
            "image holds (a crafted file?); re-save it in an image editor"
        ) from None
    except ImageError:
        raise
    except Exception as err:
        raise ImageError(_unreadable(label, err)) from err


def _header(data: bytes, label: str) -> ImageFile.ImageFile:
    """The header half of a load: identify the file and check it, nothing decoded yet."""
    if data.startswith(POSTSCRIPT):
        raise ImageError(
            f"{label} is PostScript (EPS), which Pillow reads by running Ghostscript on it; "
            "convert it to PNG first"
        )
    img = _open(stream := _Budgeted(data))
    if any(tile[0] in Image.DECODERS for tile in img.tile):  # decoded in Python, by pixel
        if img.width * img.height > SLOW_FORMAT_PIXELS:
            raise ImageError(
                f"{label} is a {img.format} image of {img.width}x{img.height}, which Pillow "
                "decodes slowly (3 s per megapixel); convert it to PNG first"
            )
        stream.reads_left = math.inf
    _check_size(img.size, label)
    return img


def _open(stream: io.BytesIO) -> ImageFile.ImageFile:
    """``Image.open``, without Pillow's DecompressionBombWarning (from 89 MP): we refuse from
    64 MP, in one line of our own. (The warnings filter is process-wide until Python 3.14:
    another thread's warning of this one kind may go unshown meanwhile.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(stream)  # reads the header only


def _jpeg_cut_short(img: Image.Image, data: bytes) -> bool:
    """Whether the JPEG's data ran out before its pixels did: a cut file with its end marker
    put back, or a header that claims more rows than the data holds. libjpeg fills the rest
    with gray and warns, but Pillow drops the warning; so when the last block is that gray,
    decode again with more data before the end marker: a complete file ignores it."""
    corner = img.crop((max(img.width - 8, 0), max(img.height - 8, 0), *img.size)).getextrema()
    bands = corner if isinstance(corner[0], tuple) else (corner,)
    if not (len({*bands}) == 1 and bands[0][0] == bands[0][1] in JPEG_FILL):
        return False
    if not data.endswith(JPEG_END):
        return False  # data after the end marker (an MPO's second image): cannot tell
    padded = data[: -len(JPEG_END)] + bytes(range(1, 255)) + JPEG_END
    try:
        with Image.open(io.BytesIO(padded)) as again:
            return again.tobytes() != img.tobytes()
    except Exception:
        return True  # a complete file parses the same with the padding


def _finish(img: Image.Image, label: str, upright: bool = False) -> Image.Image:
    """Check the size and shape, decode fully, and convert to RGB; `upright`: a file's pixels,
    turned as its EXIF orientation says (a viewer shows it so)."""
    _check_size(img.size, label)
    return _pixels(img, label, upright)


def _check_size(size: tuple[int, int], label: str) -> None:
    width, height = size
    if width * height > MAX_PIXELS:
        raise _too_big(label, f"{width}x{height}, ")
    if width * height == 0:
        raise ImageError(f"{label} is empty ({width}x{height}); pass an image with pixels")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageError(
            f"{label} is {width}x{height}, one side over {MAX_ASPECT} times the other; crop "
            "it, or pad it to a squarer shape"
        )


def _pixels(img: Image.Image, label: str, upright: bool) -> Image.Image:
    """Decode fully and convert to RGB (its size checked already)."""
    try:
        img.load()
        return _to_rgb(ImageOps.exif_transpose(img) if upright else img.copy())  # never aliased
    except _TooManyReads:
        raise
    except Exception as err:
        raise ImageError(_unreadable(label, err)) from err


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any mode to RGB: alpha composited on white, 16/32-bit and float scaled to 8 bits."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        import numpy as np

        # one float32 copy (exact to 2**24), scaled in place: float64 copies of a 64 MP
        # 16-bit PNG took 1.7 GB
        arr = np.array(img, dtype=np.float32)
        high = arr.max(initial=0)
        if img.mode.startswith("I;16") or high > 255:
            arr /= SIXTEEN_TO_EIGHT  # 16-bit range
        elif img.mode == "F" and high <= FLOAT_ONE_AT_MOST:
            arr *= 255  # float in [0, 1]
        img = Image.fromarray(_eight_bits(arr))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = (img.convert("LA") if img.mode == "La" else img).convert("RGBA")  # La: no direct way
        img = Image.new("RGB", rgba.size, "white")
        img.paste(rgba, mask=rgba.getchannel("A"))
    return img if img.mode == "RGB" else img.convert("RGB")


def _eight_bits(arr):
    """Float pixels in 0-255 as uint8: rounded, NaN as 0, the rest clipped (in place)."""
    import numpy as np

    np.nan_to_num(arr, copy=False).clip(0, 255, out=arr).round(out=arr)
    return arr.astype(np.uint8)


def _from_array(arr: object, label: str, *, torch: bool) -> Image.Image:
    """An array's pixels, read as a PIL image of that depth would be: uint16 as 16-bit
    (a 16-bit PNG's pixels, whatever their values), integers in 0-255 as 8-bit."""
    import numpy as np

    arr = np.asarray(arr)
    if torch and arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)  # CxHxW -> HxWxC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        shapes = "HxW, HxWx1, HxWx3 or HxWx4" + (" (or CxHxW)" if torch else "")
        raise ImageError(f"{label} is not an image; use shape {shapes}")
    _check_size((arr.shape[1], arr.shape[0]), label)  # before any converted copy is made
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 2:  # a band of rows at a time: a float
        eight = np.empty(arr.shape, np.uint8)  # copy of 64 MP of RGB would take 768 MB
        for rows in range(0, len(arr), 256):
            band = np.divide(arr[rows : rows + 256], SIXTEEN_TO_EIGHT, dtype=np.float32)
            eight[rows : rows + 256] = _eight_bits(band)
        arr = eight
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype.kind == "f":  # 0-1 (a little over or under: clipped), or 0-255
        arr = np.nan_to_num(arr)
        low, high = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if low < -0.05 or high > 255.5:  # a normalized tensor, say: clipping would hide it
            raise ImageError(
                f"{label} holds values from {low:.4g} to {high:.4g}, not pixels; use floats in "
                "0-1 or 0-255 (undo a normalization first)"
            )
        arr = (arr * 255 if high <= FLOAT_ONE_AT_MOST else arr).round().clip(0, 255)
        arr = arr.astype(np.uint8)
    elif arr.dtype.kind in "iu" and (arr.size == 0 or (arr.min() >= 0 and arr.max() <= 255)):
        arr = arr.astype(np.uint8)
    elif arr.dtype != np.uint8:
        values = f" (values {arr.min()} to {arr.max()})" if arr.dtype.kind in "iu" else ""
        raise ImageError(f"{label} has dtype {arr.dtype}{values}; use {ARRAY_DTYPES}")
    return _finish(Image.fromarray(np.ascontiguousarray(arr)), label)


def image_to_data_uri(img: Image.Image, format: str = "PNG") -> str:
    """Encode ``img`` as a base64 data URI, to embed it in saved chats and API messages."""
    fmt = "JPEG" if format.upper() == "JPG" else format.upper()
    if fmt == "JPEG" and img.mode not in ("RGB", "L"):
        img = _to_rgb(img)  # JPEG has no alpha
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    mime = Image.MIME.get(fmt, f"image/{fmt.lower()}")
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def image_from_data_uri(uri: str) -> Image.Image:
    """Decode a ``data:image/...;base64,...`` URI (as from ``image_to_data_uri``) to RGB."""
    return decode_image(*data_uri_bytes(uri))


def data_uri_bytes(uri: str) -> tuple[bytes, str]:
    """The bytes of a base64 data:image URI, and its label for errors."""
    head, comma, payload = uri.partition(",")
    label = f"data URI {_short(uri)}"
    if not (comma and head.lower().startswith("data:image/") and head.lower().endswith(";base64")):
        raise ImageError(f"{label} is not a base64 image URI; use 'data:image/png;base64,...'")
    payload = "".join(payload.split())
    try:
        data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except binascii.Error as err:
        raise ImageError(
            f"{label} has broken base64 ({first_line(err, 80)}); re-encode it"
        ) from err
    return data, label
