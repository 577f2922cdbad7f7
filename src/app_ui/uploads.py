"""Uploads the app cannot use, refused with one line for the page before anything decodes them.

Gradio decodes an uploaded condition with PIL while preprocessing the event's inputs, before the app sees
it: a file that is not an image, an empty file or a header that declares billions of pixels would fail
inside Gradio, leaving the page with "The upstream Gradio app has raised an exception" and the server log
with a traceback. `check_upload` reads only the file's header, and `guard_uploads` runs it before the
component's own preprocessing, so each of those gets the app's own message and the server logs nothing.
"""

from __future__ import annotations

import base64
from pathlib import Path

from src.app_ui.conditions import MAX_SIDE
from src.data import schema

#: bytes read to find the declared size: a JPEG's frame header may follow EXIF data and thumbnails.
HEADER_BYTES = 1 << 20
WHAT_TO_UPLOAD = f"upload a PNG or JPEG condition image of at most {MAX_SIDE} px a side"


def upload_head(payload) -> tuple[bytes, str] | None:
    """The first `HEADER_BYTES` of an uploaded file (a path, or a base64 `data:` URL) and its name."""
    url = getattr(payload, "url", None) or ""
    if url.startswith("data:"):
        encoded = url.partition(",")[2][: HEADER_BYTES * 4 // 3]
        return base64.b64decode(encoded[: len(encoded) // 4 * 4]), "pasted image"
    path = getattr(payload, "path", None)
    if path is None:
        return None
    with Path(path).open("rb") as file:
        return file.read(HEADER_BYTES), getattr(payload, "orig_name", None) or Path(path).name


def check_upload(head: bytes, shown: str) -> None:
    """Raise ValueError (one line, for the page) if a file starting with `head` cannot be a condition image.

    Checked without decoding: the file is not empty; its header is an image format's; the width and
    height it declares are within the app's limit (`MAX_SIDE` a side).
    """
    if not head:
        raise ValueError(f"The uploaded file '{shown}' is empty: {WHAT_TO_UPLOAD}.")
    size = schema.image_header_size(head)
    if size is None:
        raise ValueError(f"The uploaded file '{shown}' is not an image this app can read: {WHAT_TO_UPLOAD}.")
    width, height = size
    if max(width, height) > MAX_SIDE:
        raise ValueError(
            f"The uploaded image '{shown}' declares {width}x{height} px, over this app's limit of {MAX_SIDE} "
            f"px a side: {WHAT_TO_UPLOAD}."
        )


def guard_uploads(image, gr):
    """Make the `gradio.Image` component `image` check each upload (`check_upload`) before Gradio decodes it.

    The check wraps this component's own `preprocess` rather than subclassing `gradio.Image`: Gradio writes
    a `.pyi` stub beside the source of every component class it meets, which would write into the
    installed package.
    """
    decode = image.preprocess

    def preprocess(payload):
        upload = upload_head(payload) if payload is not None else None
        if upload is not None:
            try:
                check_upload(*upload)
            except ValueError as error:
                raise gr.Error(str(error), print_exception=False) from None
        return decode(payload)

    image.preprocess = preprocess
    return image
