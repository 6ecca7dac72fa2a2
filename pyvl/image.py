"""Image preprocessing for InternVL 1.5: open -> RGB -> dynamic tiling -> normalised pixel values.

This reproduces the original `load_image` (the InternVL README's quick start) exactly:

1. Open the image and convert it to RGB *first* (``PIL convert("RGB")``: palette/L images are expanded, the
   alpha of RGBA/LA is dropped without compositing). Converting first matters because Pillow resizes "P" images
   with NEAREST whatever filter is asked for. No EXIF rotation is applied (the original applies none).
2. Choose a grid of ``cols x rows`` tiles. Candidates are all (i, j) with
   ``min_num <= i*j <= max_num``, sorted by area; within one area they keep CPython's iteration order of the
   original ``set`` of tuples, which we reproduce by building the very same set. With aspect = W / H (float64),
   the candidate with the smallest ``|aspect - i/j|`` wins; on an exact float tie the later candidate wins only
   if ``W*H > 0.5 * S*S * i*j``. Size otherwise never matters (640x480 at max 12 gets 4x3 = 12 tiles).
3. Resize the whole image to ``(S*cols, S*rows)`` with Pillow BICUBIC (Pillow's default for RGB: antialiased
   convolution, a = -0.5) and crop ``S x S`` tiles row-major: tile k has box
   ``(c*S, r*S, (c+1)*S, (r+1)*S)`` with ``c = k % cols``, ``r = k // cols``.
4. If there is more than one tile (and ``use_thumbnail``), append the ORIGINAL image resized straight to
   ``S x S`` (aspect ignored) as the LAST tile. So ``N = cols*rows + (cols*rows > 1)``.
5. Normalise like torchvision ``ToTensor`` + ``Normalize``: uint8 ``[N, S, S, 3]`` -> float32 ``[N, 3, S, S]``,
   ``x = v / 255``, ``(x - mean) / std`` per channel with the ImageNet constants, every op in float32.

The torchvision resize in the original's transform is a no-op (tiles are already S x S) and is skipped.
"""

import functools
import io
import os
import stat
import warnings

import numpy as np
import torch
from PIL import Image

from pyvl import checks, pixels
from pyvl.errors import ImageError
from pyvl.ops import reference

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAX_TILES",
    "open_image",
    "rgb_pixels",
    "open_rgb_array",
    "is_raw_image",
    "candidate_grids",
    "choose_grid",
    "tile_boxes",
    "dynamic_preprocess",
    "pixel_values_reference",
    "image_to_tiles",
    "load_image",
]


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_TILES = 40  # the InternVL 1.5 model card advertises 1-40 tiles at test time
MAX_IMAGE_SIZE = (
    2048  # tile side in pixels (InternVL uses 448): 40 tiles of 2048^2 are already 2 GB of float32
)
MAX_THREADS = 1024


def _check_pixel_limit(width: int, height: int, name: str) -> None:
    # The same rule Pillow applies when decoding files; we read the limit, never change it.
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ImageError(
            f"{name}: {width}x{height} = {width * height} pixels exceeds Pillow's decompression-bomb limit "
            f"PIL.Image.MAX_IMAGE_PIXELS = {limit}; raise that limit yourself only for trusted images"
        )


def _check_size(img: Image.Image, name: str) -> None:
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: image has size {width}x{height}; expected width and height >= 1")
    _check_pixel_limit(width, height, name)


def _open_regular_file(path: str, name: str):
    """A binary file object for `path`, which must be a regular file. The open is non-blocking and the check
    is on the opened descriptor, so a FIFO (which would block until a writer comes), a device, a socket or a
    directory is refused at once, with no window for the path to be swapped in between."""
    try:
        fd = os.open(
            path,
            os.O_RDONLY
            | getattr(os, "O_NONBLOCK", 0)
            | getattr(os, "O_NOCTTY", 0)
            | getattr(os, "O_BINARY", 0),
        )
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file; expected an existing image file") from None
    except ValueError as exc:  # e.g. an embedded NUL byte
        raise ImageError(f"{name}: not a usable path ({exc})") from None
    except OSError as exc:
        raise ImageError(
            f"{name}: cannot open ({exc.strerror or exc}); expected a readable image file"
        ) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = (
            "a directory"
            if stat.S_ISDIR(mode)
            else "a FIFO"
            if stat.S_ISFIFO(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "not a file"
        )
        raise ImageError(f"{name}: cannot read image: it is {kind}; expected a regular image file")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _decode(source, name: str, finish):
    """Decode a file object fully (so truncated data fails here); finish(decoded image) is returned, called before
    the image is closed (open_image converts it to RGB, open_rgb_array reads its pixels)."""
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; we refuse both ranges.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                _check_size(img, name)  # header only: refuse before allocating pixels
                img.load()
                return finish(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(
            f"{name}: refusing to decode: {exc} (PIL.Image.MAX_IMAGE_PIXELS = {limit}; "
            f"raise it yourself only for trusted images)"
        ) from exc
    except Exception as exc:  # any decoder failure: unknown format, truncated/corrupt data, unreadable path
        raise ImageError(
            f"{name}: cannot read image ({type(exc).__name__}: {exc}); "
            f"expected a complete image file Pillow can decode (PNG, JPEG, ...)"
        ) from exc


def _check_array(arr: np.ndarray) -> None:
    name = f"numpy array of shape {arr.shape} and dtype {arr.dtype}"
    if arr.dtype != np.uint8:
        raise ImageError(f"{name}: expected dtype uint8 (values 0..255)")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ImageError(f"{name}: expected (H, W, 3) RGB, (H, W, 4) RGBA or (H, W) grayscale")
    height, width = arr.shape[:2]
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: expected height and width >= 1")
    _check_pixel_limit(width, height, name)


def _pil_from_array(arr: np.ndarray) -> Image.Image:
    """A checked array as Pillow sees it: fromarray gives mode L / RGB / RGBA (converted to RGB by the caller,
    exactly like a decoded file)."""
    return Image.fromarray(np.ascontiguousarray(arr))  # ascontiguousarray copies strided views


def _rgb_image(img: Image.Image) -> Image.Image:
    return img.convert("RGB")


def _from_pil(image: Image.Image, finish):
    """finish(image) once its pixels are loaded (a lazily opened image decodes here); ImageError otherwise."""
    name = f"PIL image (mode {image.mode}, size {image.size[0]}x{image.size[1]})"
    _check_size(image, name)
    try:
        image.load()
        return finish(image)
    except Exception as exc:
        raise ImageError(f"{name}: cannot load pixels ({type(exc).__name__}: {exc})") from exc


def _from_encoded(image, finish):
    """finish(decoded image) for a path or an image file's bytes; ImageError for those and any other type."""
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        name = f"image file {path!r}"
        with _open_regular_file(path, name) as f:
            return _decode(f, name, finish)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise ImageError("image bytes: got 0 bytes; expected the contents of an image file")
        return _decode(io.BytesIO(data), f"image bytes ({len(data)} bytes)", finish)
    raise ImageError(
        f"image of type {type(image).__name__}: expected a path, bytes, PIL.Image.Image or uint8 numpy array"
    )


def open_image(image) -> Image.Image:
    """Return `image` as a fully loaded PIL image in mode RGB (a new object; the input is never modified).

    Accepts a path (str / os.PathLike), the encoded file as bytes, a PIL image of any mode, or a uint8 numpy
    array (H, W, 3) RGB, (H, W, 4) RGBA or (H, W) grayscale. Raises ImageError on anything unreadable.
    """
    if isinstance(image, Image.Image):
        return _from_pil(image, _rgb_image)
    if isinstance(image, np.ndarray):
        _check_array(image)
        return _rgb_image(_pil_from_array(image))
    return _from_encoded(image, _rgb_image)


def is_raw_image(obj) -> bool:
    """True for the inputs `open_image` takes (path, bytes, PIL image, numpy array), as opposed to tiles."""
    return isinstance(obj, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray))


def _array_pixels(arr: np.ndarray) -> np.ndarray:
    _check_array(arr)
    if arr.ndim == 2:  # grayscale: Pillow's L -> RGB conversion
        return pixels.from_pil(_pil_from_array(arr))
    rgb = arr if arr.shape[2] == 3 else arr[..., :3]  # an RGBA array's alpha goes, as convert("RGB") drops it
    # copy(order="C") gives standard strides even where a size-1 dimension has an odd one
    return rgb if pixels.layout(rgb.shape, rgb.strides) else rgb.copy(order="C")


def rgb_pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    """The RGB pixels of a decoded image, as the native resize reads them in place: uint8 [H, W, 3] whose pixels
    are 3 or 4 bytes apart (strides (row, 3, 1) or (row, 4, 1); see pyvl.pixels), equal to
    ``np.asarray(open_image(image))``, copied only where that cannot be avoided:

    - a PIL image in mode RGB, RGBA or RGBX (4 bytes a pixel in Pillow, R, G, B first) is never converted: its
      memory is returned in place (read-only; later changes to the image show through) where Pillow >= 13 can
      export it (an image in one block: up to 4 Mpixels by default), else copied once as it is stored (pixels 4
      bytes apart). Other modes are converted to RGB once, as the original does, then read the same way.
    - a uint8 (H, W, 3) or (H, W, 4) array whose pixels are 3 or 4 bytes apart is returned as it is, or as its
      first three channels (a view): the alpha goes, as convert("RGB") drops it. Other layouts (flipped,
      transposed, broadcast, channel-strided) are copied once, packed; (H, W) grayscale is converted by Pillow.

    With 4-byte pixels the 4th byte (padding or alpha) is not part of the image: a hash of the pixels must cover
    channels 0..2 only. The array stays valid while it is referenced (it holds whatever owns the memory), even
    after the PIL image is closed. Raises ImageError for anything else (decode paths and bytes with
    open_rgb_array)."""
    if isinstance(image, Image.Image):
        return _from_pil(image, pixels.from_pil)
    if isinstance(image, np.ndarray):
        return _array_pixels(image)
    raise ImageError(
        f"image of type {type(image).__name__}: expected a decoded image, a PIL.Image.Image or a "
        "uint8 numpy array (paths and bytes: open_rgb_array)"
    )


def open_rgb_array(image) -> np.ndarray:
    """Anything `open_image` accepts, as `rgb_pixels` gives it: a path or an image file's bytes is decoded and
    its pixels read without the copy a conversion of an RGB image to RGB would make."""
    if isinstance(image, (Image.Image, np.ndarray)):
        return rgb_pixels(image)
    return _from_encoded(image, pixels.from_pil)


def _check_tile_args(min_num, max_num, image_size=448) -> None:
    checks.integer(max_num, "max_num", 1, MAX_TILES, error=ImageError)
    checks.integer(min_num, "min_num", 1, max_num, error=ImageError)
    checks.integer(image_size, "image_size", 1, MAX_IMAGE_SIZE, error=ImageError)


def candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """All (cols, rows) with min_num <= cols*rows <= max_num, in the original's exact order."""
    _check_tile_args(min_num, max_num)
    # The original builds this set and stable-sorts it by area, so equal-area grids keep CPython's set
    # iteration order. Tuples of small ints hash deterministically (no PYTHONHASHSEED), so building the
    # same set the same way reproduces that order; tests/test_image.py pins it.
    grids = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return sorted(grids, key=lambda g: g[0] * g[1])


def choose_grid(
    width: int, height: int, min_num: int = 1, max_num: int = 12, image_size: int = 448
) -> tuple[int, int]:
    """The (cols, rows) tile grid the original picks for a width x height image."""
    checks.integer(width, "width", 1, error=ImageError)
    checks.integer(height, "height", 1, error=ImageError)
    _check_tile_args(min_num, max_num, image_size)
    aspect = width / height  # float64, like the original
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(min_num, max_num):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)  # exact tie: the larger grid only if the image fills over half of it
    return best


def tile_boxes(cols: int, rows: int, image_size: int = 448) -> list[tuple[int, int, int, int]]:
    """Crop boxes (left, top, right, bottom) of the grid tiles, row-major."""
    return reference.tile_boxes(cols, rows, image_size)


def dynamic_preprocess(
    img: Image.Image, min_num: int = 1, max_num: int = 12, image_size: int = 448, use_thumbnail: bool = True
) -> list[Image.Image]:
    """Split an RGB image into S x S tiles (row-major), plus the thumbnail last when there are several."""
    if not isinstance(img, Image.Image) or img.mode != "RGB":
        got = f"PIL image in mode {img.mode}" if isinstance(img, Image.Image) else type(img).__name__
        raise ImageError(f"dynamic_preprocess: got {got}; expected a PIL image in mode RGB (use open_image)")
    _check_size(img, "dynamic_preprocess input")
    cols, rows = choose_grid(img.width, img.height, min_num, max_num, image_size)
    return reference.tile_images(img, cols, rows, image_size, use_thumbnail)


def pixel_values_reference(tiles: np.ndarray) -> torch.Tensor:
    """uint8 tiles [N, H, W, 3] -> float32 [N, 3, H, W], exactly torchvision ToTensor + Normalize(ImageNet)."""
    if not isinstance(tiles, np.ndarray) or tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[3] != 3:
        desc = (
            f"{tiles.dtype} array of shape {tiles.shape}"
            if isinstance(tiles, np.ndarray)
            else type(tiles).__name__
        )
        raise ImageError(f"pixel_values_reference: got {desc}; expected uint8 [N, H, W, 3]")
    return reference.normalize_tiles(tiles, IMAGENET_MEAN, IMAGENET_STD)


def image_to_tiles(
    image,
    resize_tiles,
    max_num: int = 12,
    min_num: int = 1,
    image_size: int = 448,
    use_thumbnail: bool = True,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """The tiling policy around a ``resize_tiles`` op (pyvl.ops): open, choose the grid, normalise with the
    ImageNet constants. Tiles [N, 3, S, S] in ``dtype`` on ``device``; a loaded model passes its own op
    (``model.model.ops.resize_tiles``), its dtype and its device."""
    _check_tile_args(min_num, max_num, image_size)
    rgb = open_rgb_array(image)
    cols, rows = choose_grid(rgb.shape[1], rgb.shape[0], min_num, max_num, image_size)
    return resize_tiles(
        rgb,
        cols,
        rows,
        image_size,
        use_thumbnail,
        IMAGENET_MEAN,
        IMAGENET_STD,
        dtype=dtype,
        device=torch.device(device),
    )


def _load_image_op(device: torch.device, use_native: bool, num_threads: int):
    """load_image's resize_tiles: CUDA on a CUDA device (a missing extension is an error there), the C++ kernel
    on the CPU when built and wanted; the Pillow + torch reference otherwise, and whenever the installed Pillow
    is not a release the kernels reproduce (with a warning)."""
    if device.type == "cuda":
        from pyvl.ops import preprocess

        return (
            preprocess.resize_tiles_cuda if preprocess.matches_installed_pillow() else reference.resize_tiles
        )
    if use_native:
        try:
            from pyvl.ops import preprocess
        except ImportError:  # the compiled extension is unavailable (e.g. a source checkout)
            return reference.resize_tiles
        if preprocess.matches_installed_pillow():
            return functools.partial(preprocess.resize_tiles_cpu, num_threads=num_threads)
    return reference.resize_tiles


def load_image(
    image,
    max_num: int = 12,
    min_num: int = 1,
    image_size: int = 448,
    use_thumbnail: bool = True,
    use_native: bool = True,
    num_threads: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The original `load_image`: pixel values float32 [N, 3, S, S] for one image (N tiles, thumbnail last).

    `image` is anything `open_image` accepts. By default the fused C++ kernel (pyvl.ops.native.resize_tiles)
    resizes, tiles and normalises in one pass, bit-identical to the Pillow + torchvision pipeline, using
    `num_threads` threads (0 = all cores). `use_native=False` runs that Pillow + torch pipeline itself (the
    reference), which is also the fallback when the extension is not built.
    `device="cuda"` runs the same arithmetic on the GPU (pyvl.ops.native.resize_tiles_cuda: the decoded image
    is uploaded once, tiles come back on the device in `dtype`, float32 or bfloat16); on the CPU `dtype` must be
    float32. A loaded model preprocesses raw images itself, through its op table (``InternVLChat.tile_images``).
    """
    _check_tile_args(min_num, max_num, image_size)
    checks.boolean(use_thumbnail, "use_thumbnail", ImageError)
    checks.boolean(use_native, "use_native", ImageError)
    checks.integer(num_threads, "num_threads", 0, MAX_THREADS, ImageError)
    if not isinstance(dtype, torch.dtype):
        raise ImageError(
            f"load_image: dtype must be a torch.dtype (torch.float32, torch.bfloat16), got {dtype!r}"
        )
    try:
        device = torch.device(device) if device is not None else torch.device("cpu")
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ImageError(f"load_image: device={device!r} is not a torch device ({exc})") from None
    if device.type == "cuda":
        if dtype not in (torch.float32, torch.bfloat16):
            raise ImageError(f"load_image: on {device} the tiles are float32 or bfloat16; got dtype={dtype}")
    elif dtype != torch.float32 or device.type != "cpu":
        raise ImageError(
            f"load_image: on {device} the tiles are float32; got dtype={dtype} (bf16 tiles come "
            "from device='cuda')"
        )
    resize_tiles = _load_image_op(device, use_native, num_threads)
    return image_to_tiles(image, resize_tiles, max_num, min_num, image_size, use_thumbnail, dtype, device)
