"""Read the FVQA image-search cache pickles without running the code a pickle may name.

``pickle.load`` calls whatever a pickle names (``os.system`` in a ``__reduce__``, say), so a downloaded
pickle is as trusted as a downloaded script. ``SafeUnpickler`` admits only what the released cache needs,
by ``find_class`` (every global a pickle refers to passes through it, ``GLOBAL``/``STACK_GLOBAL``/``INST``/
``OBJ`` and the ``EXT`` extension codes alike):

- builtins containers and scalars (``dict``, ``list``, ``tuple``, ``set``, ``str``, ``bytes``...), by name:
  ``builtins.eval`` or ``builtins.getattr`` are refused like any other name;
- ``copyreg._reconstructor`` and ``builtins.object`` (how protocols 0-1 rebuild objects) and
  ``_codecs.encode`` (how protocol 2 stores ``bytes``), which only ever reach the admitted classes;
- PIL images: ``PIL.Image.Image`` and the file classes a thumbnail is decoded as (``JpegImageFile``...).
  They are *not* Pillow's classes: ``find_class`` hands back ``PickledImage``, whose ``__setstate__``
  reads Pillow's pickled state ``[info, mode, size, palette, data, ...]`` (Pillow 3 to 13; the extra fields
  of newer ``ImageFile``/``JpegImageFile`` states, filename and layers, are ignored: readers of this cache
  report that Pillow 12's own ``JpegImageFile.__setstate__`` cannot unpack it), checks it, and rebuilds
  the pixels with ``Image.frombytes``. A broken image becomes an ``error`` to report, not a load failure;
- what a JPEG's ``info`` dict may hold: ``PIL.TiffImagePlugin.IFDRational`` (EXIF dpi) and
  ``fractions.Fraction``.

Anything else raises ``UnsafePickle`` naming the file and the class, before it is imported or called.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
from pathlib import Path
from typing import Any

from PIL import Image

BUILTINS = frozenset({"dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float",
                      "bool", "complex", "object"})  # fmt: skip
PIL_IMAGE_CLASSES = frozenset({
    ("PIL.Image", "Image"), ("PIL.ImageFile", "ImageFile"), ("PIL.JpegImagePlugin", "JpegImageFile"),
    ("PIL.MpoImagePlugin", "MpoImageFile"), ("PIL.PngImagePlugin", "PngImageFile"),
    ("PIL.WebPImagePlugin", "WebPImageFile"), ("PIL.GifImagePlugin", "GifImageFile"),
    ("PIL.BmpImagePlugin", "BmpImageFile"), ("PIL.TiffImagePlugin", "TiffImageFile"),
})  # fmt: skip
# bits per pixel of the raw data Pillow pickles, per mode
MODE_BITS = {"1": 1, "L": 8, "P": 8, "LA": 16, "PA": 16, "I;16": 16, "RGB": 24, "YCbCr": 24, "RGBA": 32, "RGBX": 32,
             "CMYK": 32, "I": 32, "F": 32}  # fmt: skip
MODES = frozenset(MODE_BITS)
MAX_PIXELS = 64_000_000  # far above any search thumbnail; a pickled size beyond it is refused before allocating


class UnsafePickle(pickle.UnpicklingError):
    """A pickle names a global outside the allow-list; the message names the file and the global."""


class PickledImage:
    """What a pickled PIL image loads as: ``image`` (RGB) or, when its state is unusable, ``error``."""

    image: Image.Image | None = None
    error: str = ""

    def __setstate__(self, state: Any) -> None:
        try:
            self.image = image_from_state(state)
        except (TypeError, ValueError, OSError) as exc:  # Pillow says ValueError for short data
            self.error = f"pickled image is unreadable ({exc})"


def image_from_state(state: Any) -> Image.Image:
    """An RGB image from Pillow's pickled state ``[info, mode, size, palette, data, ...]``."""
    if not isinstance(state, list | tuple) or len(state) < 5:
        raise TypeError(f"expected Pillow's state list [info, mode, size, palette, data, ...], got {state!r:.60}")
    _, mode, size, palette, data = state[:5]
    if mode not in MODES:
        raise ValueError(f"unknown image mode {mode!r}")
    if not (isinstance(size, list | tuple) and len(size) == 2 and all(isinstance(n, int) and n > 0 for n in size)):
        raise ValueError(f"bad image size {size!r:.40}")
    if not isinstance(data, bytes | bytearray):
        raise TypeError(f"image data is {type(data).__name__}, not bytes")
    # checked before Image.frombytes, which allocates the full size first: a pickle must not choose the allocation
    width, height = size
    expected = (width * MODE_BITS[mode] + 7) // 8 * height
    if width * height > MAX_PIXELS or len(data) < expected:
        raise ValueError(f"image of {width}x{height} {mode} needs {expected} bytes, the pickle holds {len(data)} "
                         f"(at most {MAX_PIXELS} pixels)")  # fmt: skip
    image = Image.frombytes(mode, tuple(size), bytes(data))
    if mode in ("P", "PA", "L", "LA") and palette:
        image.putpalette(palette)
    return image.convert("RGB")


class SafeUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` with the allow-list of the module docstring; ``source`` names the file in errors."""

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        # protocols 0-2 write Python 2 names (``__builtin__``, ``copy_reg``): mapped as ``pickle`` maps them
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if module == "builtins" and name in BUILTINS:
            return super().find_class(module, name)
        if (module, name) in {("copyreg", "_reconstructor"), ("_codecs", "encode"), ("fractions", "Fraction")}:
            return super().find_class(module, name)
        if (module, name) == ("PIL.TiffImagePlugin", "IFDRational"):
            return super().find_class(module, name)
        if (module, name) in PIL_IMAGE_CLASSES:
            return PickledImage
        raise UnsafePickle(
            f"{self.source}: refusing to unpickle {module}.{name}: the FVQA image-search cache holds only builtin "
            f"containers, strings and PIL images (see mmsr.tools.fvqa_pickle); this file is not that cache, or "
            f"it was tampered with"
        )


def safe_load(path: str | Path) -> Any:
    """The object pickled in ``path``, read with ``SafeUnpickler`` (``UnsafePickle`` on a refused global,
    ``pickle.UnpicklingError`` naming the file on any other failure to load)."""
    with open(path, "rb") as f:
        try:
            return SafeUnpickler(f, str(path)).load()
        except UnsafePickle:
            raise
        except Exception as exc:  # a corrupt file can raise almost anything (LookupError, MemoryError ...)
            raise pickle.UnpicklingError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None
