"""Images of a request: `data:` URLs, and local files only inside the directory the server was told to allow.

This is the only place where a request names something on the server's disk: a regular file inside
`--allowed-image-dir` (symlinks resolved first, so a link cannot lead outside), read up to `MAX_IMAGE_BYTES`.
Nothing else a request gives reaches the file system: the `corematching` field is an allow-list of typed scalars
(corematching.apps.serve.request_methods), never a path. Remote URLs are not fetched.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from .errors import APIError, bad_request

MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_PATH_CHARS = 4096


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image  # RGB
    digest: str  # sha256 of the encoded bytes: the image's identity in the prompt cache


def load_image(url, allowed_dir: Path | None, param: str) -> LoadedImage:
    """The image an `image_url.url` names. Raises a 400 APIError naming `param` when it cannot be used."""
    if not isinstance(url, str) or not url:
        raise bad_request("image_url.url must be a non-empty string", param=param)
    if url.startswith("data:"):
        return decode_image(data_url_bytes(url, param), param)
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https", "ftp"):
        raise bad_request("remote image URLs are not fetched by this server; send the image as a data: URL",
                          param=param, code="unsupported_image_url")
    if allowed_dir is None:
        raise bad_request("local image paths are disabled on this server (start it with --allowed-image-dir); "
                          "send the image as a data: URL", param=param, code="local_images_disabled")
    path = local_path(url, allowed_dir, param)
    try:
        with path.open("rb") as handle:
            content = handle.read(MAX_IMAGE_BYTES + 1)  # never more, even if the file grew after the check
    except OSError:
        raise bad_request("image file cannot be read", param=param, code="image_not_found") from None
    if len(content) > MAX_IMAGE_BYTES:
        raise bad_request(f"image file is larger than {MAX_IMAGE_BYTES} bytes", param=param)
    return decode_image(content, param)


def data_url_bytes(url: str, param: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or ";base64" not in header:
        raise bad_request("a data: URL image must be base64-encoded (data:image/png;base64,...)", param=param)
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise bad_request(f"image is larger than {MAX_IMAGE_BYTES} bytes", param=param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("the data: URL is not valid base64", param=param, code="invalid_image") from None


def local_path(url: str, allowed_dir: Path, param: str) -> Path:
    """The file a `file://` URL or a plain path names, if it lies inside `allowed_dir` (symlinks resolved)."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise bad_request("file: URLs must name a local path", param=param)
        raw = unquote(parsed.path)
    elif parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive, not a scheme
        raise bad_request(f"unsupported image URL scheme {parsed.scheme!r}", param=param)
    else:
        raw = url
    if "\x00" in raw or len(raw) > MAX_PATH_CHARS:
        raise bad_request("image path is not a valid path", param=param, code="invalid_image_path")
    root = allowed_dir.resolve()
    outside = bad_request("image path is outside the directory this server allows", param=param,
                          code="image_path_not_allowed")
    try:
        candidate = Path(raw)
        candidate = (candidate if candidate.is_absolute() else root / candidate).resolve()
    except (OSError, ValueError, RuntimeError):  # too long, a symlink loop, ...: the same answer as outside
        raise outside from None
    if not candidate.is_relative_to(root):
        # The same answer whether or not the file exists: nothing is revealed about the rest of the disk.
        raise outside
    try:
        regular = candidate.is_file()  # a regular file: never a FIFO or a device that would block a reader
    except (OSError, ValueError):
        regular = False
    if not regular:
        raise bad_request("image file not found in the allowed directory", param=param, code="image_not_found")
    return candidate


def decode_image(content: bytes, param: str) -> LoadedImage:
    if not content:
        raise bad_request("image is empty", param=param, code="invalid_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(content))
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise bad_request(f"image has more than {MAX_IMAGE_PIXELS} pixels", param=param)
            if image.mode not in ("RGB", "RGBA", "L", "P", "LA", "I;16", "1", "CMYK"):
                raise bad_request(f"unsupported image mode {image.mode!r}", param=param, code="invalid_image")
            image.load()
            rgb = image.convert("RGB")
    except APIError:
        raise
    except Exception as error:  # a hostile file can make a decoder fail in many ways; none is the server's fault
        raise bad_request(f"image cannot be decoded: {type(error).__name__}", param=param,
                          code="invalid_image") from None
    return LoadedImage(rgb, hashlib.sha256(content).hexdigest())
