"""A small but real DataComp pool, made the way DataComp makes pools, for tests and demos.

``build_toy_pool(OUT)`` writes::

    OUT/metadata/<32-hex>.parquet      2 files; DataComp's columns and dtypes (SPEC.md section 2)
    OUT/shards/{:08d}.tar              webdataset shards written by img2dataset.download
    OUT/shards/{:08d}.parquet          img2dataset's per-shard table (failed rows included)
    OUT/shards/{:08d}_stats.json       img2dataset's per-shard counts
    OUT/pool_manifest.json             what each row is meant to be (see below)

How it is made
--------------
* The pictures are the real photos that ship inside installed packages (scikit-image's
  ``skimage.data``, scikit-learn's sample images, matplotlib's Grace Hopper, matplotlib's gift-box
  PNG), encoded here as JPEG (RGB, greyscale, CMYK, progressive, with EXIF), PNG (RGBA, greyscale)
  and WebP, plus one generated 10000 x 10000 PNG.
* The alt-texts are written by hand in this module (``_PHOTOS``, ``_BROKEN``): for each photo an
  aligned one (a plain true description), a misaligned one (another photo's aligned text), a
  medium-phrase variant ("a photo of ...", "stock photo", ...) and a hard-but-true one (true but
  unusual wording: names, jargon, emoji, Chinese). Broken rows: dead URLs (404, 410), HTML served
  instead of an image, a truncated JPEG, a zero-byte body, a huge image, an empty alt-text,
  mojibake, control characters and an over-long alt-text.
* The metadata folder is written first; then a loopback HTTP server (127.0.0.1, port 0, threaded,
  silent) serves the pictures while ``img2dataset.download`` is called with DataComp's settings from
  download_upstream.py, so the shards are what DataComp's own download step would produce.
  The URLs name the fictitious host ``*.toy-pool.invalid``; for the duration of the download the
  loopback server is set as img2dataset's HTTP proxy (``http_proxy``), so every request goes to
  127.0.0.1 and nothing else, and the URLs (hence the uids and the metadata files) do not depend on
  the port the server got. The URLs are dead once the build returns, like many of DataComp's.
* One deliberate difference from DataComp: ``number_sample_per_shard`` is ``samples_per_shard``
  (default 40) instead of DataComp's 10000, so that ~85 rows give 3 shards and shard boundaries
  are exercised. img2dataset cuts shards per metadata file, so the 2 metadata files (50 rows and
  the rest, 34) give shards 00000000-00000002 of 40, 10 and 34 rows.
* ``retries`` is img2dataset's default 0: download_upstream.py does not pass it. Dead URLs answer
  404/410 at once, so nothing waits on a timeout.

Nulls (DataComp's metadata has none; readers should cope): ``sha256`` is null where the server
sends no body (404/410); ``original_width``/``original_height`` are null where the served bytes have
no readable image header; both CLIP columns are null where the served bytes do not decode into a
complete image, and everywhere with ``clip="none"``.

CLIP columns are only ever filled with scores a CLIP model computed, on the served bytes, as
DataComp's ``clip_*_similarity_score``: the raw cosine of the L2-normalised image and text
features (not x100, not clamped). ``clip="tiny"`` uses two tiny randomly initialised open_clip
models (seeded; real computations, meaningless values); ``clip="openai"`` uses OpenAI's ViT-B/32
and ViT-L/14 weights and works only where they are already in a local cache.

Manifest
--------
``OUT/pool_manifest.json`` lists every row in metadata order with its uid, url, text, photo,
category (``aligned``, ``misaligned``, ``medium_phrase``, ``hard``, ``broken:<reason>``), the
status img2dataset expected and got, its key and shard, and how the CLIP columns were made.
``load_manifest(OUT)`` reads it; ``rows_by_uid(OUT)`` indexes its rows by uid.

img2dataset starts worker processes with the ``spawn`` method: a script that calls
``build_toy_pool`` must do so under ``if __name__ == "__main__":``. img2dataset also installs a
SIGINT handler, so the build must run in the main thread; the previous handler is put back
afterwards. For the duration of the download the process environment carries the proxy settings
above (and W&B / albumentations switches); they are restored afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import UserError

MANIFEST_NAME = "pool_manifest.json"
MANIFEST_VERSION = 1
CLIP_MODES = ("none", "tiny", "openai")

# DataComp's metadata schema, in DataComp's column order (SPEC.md section 2).
METADATA_COLUMNS = (
    "uid",
    "url",
    "text",
    "original_width",
    "original_height",
    "clip_b32_similarity_score",
    "clip_l14_similarity_score",
    "face_bboxes",
    "sha256",
)

# All URLs name hosts under this fictitious domain (.invalid never resolves, RFC 6761).
POOL_DOMAIN = "toy-pool.invalid"

# Share of rows in the first of the two metadata files.
_FIRST_FILE_ROWS = 50

# img2dataset settings: DataComp's download_upstream.py, except the ones marked.
_IMG2DATASET_SETTINGS = dict(
    image_size=512,
    resize_mode="keep_ratio_largest",
    resize_only_if_bigger=True,
    encode_format="jpg",
    output_format="webdataset",
    input_format="parquet",
    url_col="url",
    caption_col="text",
    bbox_col="face_bboxes",
    oom_shard_count=8,
    # not DataComp's (16 processes, 128 threads): a toy pool on a small machine
    processes_count=1,
    thread_count=8,
    # img2dataset's own defaults, written out: DataComp does not pass them
    retries=0,
    timeout=10,
    compute_hash="sha256",
    enable_wandb=False,
)


# ---------------------------------------------------------------------------------------------
# The data: photos, their alt-texts, and the broken rows
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Photo:
    name: str
    source: str  # "skimage:<fn>", "sklearn:<file>", "matplotlib:<file>", "generated:<what>"
    encoding: str  # see _encode
    site: str  # host prefix under POOL_DOMAIN
    aligned: str  # a plain true description
    hard: str  # true, but worded the way a captioner would not
    misaligned_from: str  # whose aligned text is this photo's misaligned text
    face_bboxes: tuple = ()
    extra_hard: tuple = ()  # further hard-but-true texts


# The astronaut's face: skimage.feature.Cascade (the LBP frontal-face cascade shipped with
# scikit-image) finds it at row 70, column 175, 93 x 93 pixels in the 512 x 512 image.
# Grace Hopper's face is detectable too, but only the astronaut carries a box here.
_ASTRONAUT_FACE = ((0.3418, 0.1367, 0.5234, 0.3184),)

_PHOTOS = (
    _Photo(
        "astronaut", "skimage:astronaut", "jpeg", "img.nasa-fan",
        "a smiling astronaut in an orange spacesuit in front of an American flag and a model of the space shuttle",
        "Eileen Collins, the first woman to pilot the space shuttle",
        "gravel", face_bboxes=_ASTRONAUT_FACE,
    ),
    _Photo(
        "chelsea", "skimage:chelsea", "jpeg", "cdn.petblog",
        "close-up of a tabby cat's face with green eyes",
        "Chelsea the tabby giving the lens a suspicious stare",
        "rocket",
    ),
    _Photo(
        "coffee", "skimage:coffee", "jpeg-cmyk", "static.cafe-reviews",
        "a cup of espresso on a red saucer with a spoon, on a wooden table",
        "espresso at Pikolo Espresso Bar \u2615 crema, red china, wood grain",
        "hubble_deep_field",
    ),
    _Photo(
        "rocket", "skimage:rocket", "jpeg-progressive", "media.spacenews",
        "a rocket standing on the launch pad at dusk between tall towers",
        "Falcon 9 with DSCOVR on Launch Complex 40, Cape Canaveral",
        "flower",
    ),
    _Photo(
        "stereo_motorcycle", "skimage:stereo_motorcycle", "jpeg-exif", "forum.bikers",
        "a red motorcycle parked in a garage workshop",
        "left view of the Middlebury 2014 stereo pair: a motorbike among shelves",
        "page",
    ),
    _Photo(
        "camera", "skimage:camera", "jpeg-gray", "archive.testimages",
        "a man in a dark coat looking through a camera on a tripod in a field, black and white",
        "the cameraman: a classic grayscale test picture for segmentation and denoising",
        "coffee",
    ),
    _Photo(
        "coins", "skimage:coins", "png-gray", "collections.museum",
        "rows of old silver coins on a dark background",
        "Greek coins from Pompeii, Brooklyn Museum collection",
        "gift",
    ),
    _Photo(
        "moon", "skimage:moon", "jpeg-gray", "img.astro-club",
        "the grey cratered surface of the moon",
        "lunar regolith, pockmarked by impacts, low contrast",
        "stereo_motorcycle",
    ),
    _Photo(
        "page", "skimage:page", "png-gray", "scans.course-notes",
        "a printed page of text about region-based segmentation",
        "scanned tutorial paragraph: markers found at the two extreme parts of the histogram of grey values",
        "chelsea",
    ),
    _Photo(
        "hubble_deep_field", "skimage:hubble_deep_field", "jpeg", "img.astro-club",
        "many small colourful galaxies scattered across a black sky",
        "Hubble eXtreme Deep Field: almost every speck is a galaxy",
        "brick",
    ),
    _Photo(
        "retina", "skimage:retina", "jpeg", "cdn.eye-clinic",
        "the back of a human eye: an orange-red retina with the optic disc and blood vessels",
        "fundus photography of a normal left eye",
        "camera",
    ),
    _Photo(
        "immunohistochemistry", "skimage:immunohistochemistry", "jpeg", "slides.pathology-lab",
        "a microscope view of tissue stained brown and blue",
        "IHC: FHL2 revealed with DAB in colonic glands, hematoxylin counterstain",
        "grace_hopper",
    ),
    _Photo(
        "brick", "skimage:brick", "jpeg-gray", "textures.cc0",
        "a grey brick wall",
        "masonry texture, staggered courses",
        "china",
    ),
    _Photo(
        "gravel", "skimage:gravel", "png-gray", "textures.cc0",
        "a close-up of small grey gravel stones",
        "loose aggregate ground texture seen from above",
        "astronaut",
    ),
    _Photo(
        "china", "sklearn:china.jpg", "jpeg", "travel.blog",
        "a Chinese pagoda on a hill above a lake, among trees",
        "multi-tiered tower with sweeping eaves, hazy water beyond",
        "coins",
        extra_hard=("\u6e56\u8fb9\u5c71\u4e0a\u7684\u4e2d\u56fd\u53e4\u5854",),  # "an old Chinese pagoda on a hill by a lake"
    ),
    _Photo(
        "flower", "sklearn:flower.jpg", "webp", "garden.blog",
        "an orange dahlia flower against dark green leaves",
        "apricot dahlia bloom, shallow depth of field",
        "immunohistochemistry",
    ),
    _Photo(
        "grace_hopper", "matplotlib:grace_hopper.jpg", "jpeg", "history.computing",
        "portrait of an older woman in a navy uniform and cap in front of an American flag",
        "Rear Admiral Grace Hopper, computer science pioneer, US Navy portrait",
        "retina",
    ),
    _Photo(
        "gift", "matplotlib:Minduka_Present_Blue_Pack.png", "png-rgba", "shop.clipart",
        "a blue gift box tied with a silver ribbon and bow",
        "a present for you \U0001f381",
        "moon",
    ),
)

# Medium-phrase variants: the aligned text wrapped in phrases Sieve's masking removes (SPEC.md 1).
_MEDIUM_TEMPLATES = (
    "a photo of {t}",
    "{t} stock photo",
    "an image of {t}",
    "photo stock: {t}",
    "{t}, photo",
    "image: {t}",
    "Stock Photo - {t}",
)

# The huge picture: 10000 x 10000, 1-bit PNG, a few tens of kB.
_HUGE_SIDE = 10000
_HUGE_PHOTO = _Photo(
    "huge_circle", f"generated:{_HUGE_SIDE}x{_HUGE_SIDE} 1-bit PNG of a black disc", "png-bilevel",
    "hires.wallpapers", "a black circle on a white background", "", "",
)

_LONG_TEXT = (
    "a smiling astronaut in an orange spacesuit in front of an American flag and a model of the space "
    "shuttle " + " ".join(
        ["astronaut portrait", "NASA", "space shuttle", "orange suit", "flag", "helmet", "wallpaper",
         "HD", "free download", "best astronaut pictures 2011", "space", "science", "rocket", "mission"] * 6
    )
)

# (reason, photo or None, text, how the URL is served, expected img2dataset status)
_BROKEN = (
    ("dead_url", None, "sunset over a calm sea with a sailing boat", "404", "failed_to_download"),
    ("dead_url", None, "a red bicycle leaning against a wooden fence", "404", "failed_to_download"),
    ("gone_url", None, "a bowl of ramen with a soft-boiled egg", "410", "failed_to_download"),
    ("html_not_image", None, "a golden retriever puppy lying on the grass", "html", "failed_to_resize"),
    ("zero_bytes", None, "a lighthouse on a rocky coast", "empty", "failed_to_resize"),
    ("truncated_jpeg", "chelsea", "close-up of a tabby cat's face with green eyes", "truncated", "failed_to_resize"),
    ("huge_image", "huge_circle", "a black circle on a white background", "photo", "success"),
    ("empty_text", "rocket", "", "photo", "success"),
    ("mojibake_text", "coffee", "espresso at the caf\u00c3\u00a9 on a red saucer \u00e2\u20ac\u201d delicious",
     "photo", "success"),
    ("control_chars_text", "chelsea", "close-up of a tabby cat\x07 with green eyes\x1b[0m\u200b\r\n\t",
     "photo", "success"),
    ("long_text", "astronaut", _LONG_TEXT, "photo", "success"),
)

_HTML_BODY = (
    b"<!DOCTYPE html>\n<html><head><title>Page moved</title></head>"
    b"<body><h1>This page has moved</h1><p>Please update your bookmarks.</p></body></html>\n"
)


@dataclass
class _Row:
    url: str
    text: str
    photo: Optional[str]
    category: str
    serve: str  # "photo", "truncated", "empty", "html", "404", "410"
    expected_status: str
    face_bboxes: tuple = ()
    uid: str = field(init=False)

    def __post_init__(self):
        self.uid = uid_for_url(self.url)


def uid_for_url(url: str) -> str:
    """The row's uid: 32 lowercase hex characters, the MD5 of its URL."""
    return hashlib.md5(url.encode("utf-8"), usedforsecurity=False).hexdigest()


def _ext(encoding: str) -> str:
    if encoding.startswith("png"):
        return "png"
    if encoding == "webp":
        return "webp"
    return "jpg"


def _plan_rows() -> list[_Row]:
    """Every row of the pool, in metadata order (fixed; independent of the build's seed)."""
    by_name = {p.name: p for p in _PHOTOS}
    rows: list[_Row] = []
    for i, p in enumerate(_PHOTOS):
        base = f"http://{p.site}.{POOL_DOMAIN}"
        ext = _ext(p.encoding)
        variants = [
            ("aligned", p.aligned),
            ("misaligned", by_name[p.misaligned_from].aligned),
            ("medium_phrase", _MEDIUM_TEMPLATES[i % len(_MEDIUM_TEMPLATES)].format(t=p.aligned)),
            ("hard", p.hard),
        ] + [("hard", t) for t in p.extra_hard]
        for j, (category, text) in enumerate(variants):
            url = f"{base}/{p.name.replace('_', '-')}/{category.replace('_', '-')}-{j}.{ext}"
            rows.append(_Row(url, text, p.name, category, "photo", "success", p.face_bboxes))
    photos = dict(by_name, **{_HUGE_PHOTO.name: _HUGE_PHOTO})
    for j, (reason, photo, text, serve, expected) in enumerate(_BROKEN):
        p = photos.get(photo) if photo else None
        if p is not None:
            url = f"http://{p.site}.{POOL_DOMAIN}/{reason.replace('_', '-')}/{p.name.replace('_', '-')}-{j}.{_ext(p.encoding)}"
        elif serve == "html":
            url = f"http://www.free-pics.{POOL_DOMAIN}/view.php?id={j}&size=large"
        else:
            url = f"http://old-blog.{POOL_DOMAIN}/2009/07/{reason.replace('_', '-')}-{j}.jpg"
        rows.append(_Row(url, text, photo, f"broken:{reason}", serve, expected,
                         p.face_bboxes if p is not None else ()))
    # a fixed interleaving, so categories and broken rows spread over both files and all shards
    order = sorted(range(len(rows)), key=lambda k: hashlib.sha256(f"order:{rows[k].url}".encode()).hexdigest())
    return [rows[k] for k in order]


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------


def photo_array(source: str):
    """An RGB(A)/greyscale uint8 array for a photo source; never touches the network."""
    import numpy as np

    kind, name = source.split(":", 1)
    if kind == "skimage":
        import skimage.data

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = getattr(skimage.data, name)()
        if isinstance(a, tuple):  # stereo_motorcycle: (left, right, disparity)
            a = a[0]
        return np.asarray(a)
    if kind == "sklearn":
        from sklearn.datasets import load_sample_image

        return np.asarray(load_sample_image(name))
    if kind == "matplotlib":
        from matplotlib import cbook
        from PIL import Image

        with Image.open(cbook.get_sample_data(name, asfileobj=False)) as im:
            return np.asarray(im.copy())
    raise ValueError(f"unknown photo source {source}")


def _encode(photo: _Photo) -> bytes:
    """The bytes the server sends for a photo, in the photo's encoding."""
    from PIL import Image

    buf = io.BytesIO()
    if photo.encoding == "png-bilevel":
        from PIL import ImageDraw

        im = Image.new("1", (_HUGE_SIDE, _HUGE_SIDE), 1)
        q = _HUGE_SIDE // 4
        ImageDraw.Draw(im).ellipse((q, q, 3 * q, 3 * q), fill=0)
        im.save(buf, "PNG")
        return buf.getvalue()

    im = Image.fromarray(photo_array(photo.source))
    enc = photo.encoding
    if enc == "png-rgba":
        im.convert("RGBA").save(buf, "PNG")
    elif enc == "png-gray":
        im.convert("L").save(buf, "PNG")
    elif enc == "webp":
        im.convert("RGB").save(buf, "WEBP", quality=90, method=4)
    elif enc == "jpeg-gray":
        im.convert("L").save(buf, "JPEG", quality=90)
    elif enc == "jpeg-cmyk":
        im.convert("CMYK").save(buf, "JPEG", quality=90)
    elif enc == "jpeg-progressive":
        im.convert("RGB").save(buf, "JPEG", quality=90, progressive=True)
    elif enc == "jpeg-exif":
        exif = Image.Exif()
        exif[0x010F] = "toy-pool"  # Make
        exif[0x0110] = "datacomp-sieve"  # Model
        exif[0x0131] = "datacomp-sieve toy_pool"  # Software
        exif[0x0132] = "2011:08:21 12:00:00"  # DateTime
        im.convert("RGB").save(buf, "JPEG", quality=90, exif=exif.tobytes())
    elif enc == "jpeg":
        im.convert("RGB").save(buf, "JPEG", quality=90)
    else:
        raise ValueError(f"unknown encoding {enc}")
    return buf.getvalue()


def _served_bodies(rows: list[_Row]) -> dict[str, tuple[int, str, bytes]]:
    """URL -> (HTTP status, content type, body) for everything the server answers."""
    photos = {p.name: p for p in _PHOTOS + (_HUGE_PHOTO,)}
    encoded: dict[str, bytes] = {}

    def photo_bytes(name: str) -> bytes:
        if name not in encoded:
            encoded[name] = _encode(photos[name])
        return encoded[name]

    ctype = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
    routes: dict[str, tuple[int, str, bytes]] = {}
    for r in rows:
        if r.serve == "photo":
            p = photos[r.photo]
            routes[r.url] = (200, ctype[_ext(p.encoding)], photo_bytes(r.photo))
        elif r.serve == "truncated":
            b = photo_bytes(r.photo)
            routes[r.url] = (200, "image/jpeg", b[: len(b) // 2])
        elif r.serve == "empty":
            routes[r.url] = (200, "image/jpeg", b"")
        elif r.serve == "html":
            routes[r.url] = (200, "text/html; charset=utf-8", _HTML_BODY)
        elif r.serve == "410":
            routes[r.url] = (410, "text/html", b"<html><body>Gone</body></html>\n")
        # "404": not routed; the server answers 404 for anything it does not know
    return routes


def _open_image(body: bytes, full: bool):
    """The header size (full=False) or the complete RGB picture (full=True); None when the bytes
    are not an image (or, for full, do not decode into a whole one)."""
    from PIL import Image

    if not body:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(body)) as im:
                if not full:
                    return im.size
                im.load()
                return im.convert("RGB")
    except Exception:  # PIL raises several kinds for non-images and truncated files
        return None


# ---------------------------------------------------------------------------------------------
# The loopback server
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _loopback_server(routes: dict[str, tuple[int, str, bytes]]):
    """Serve ``routes`` on 127.0.0.1 (port 0) as an HTTP proxy; yields (proxy URL, hits, stray).

    Requests arrive in proxy form (``GET http://host/path``); a direct request
    (``GET /path`` with a Host header) is answered the same way. ``hits`` counts the URLs asked
    for; ``stray`` counts https tunnels (CONNECT) asked for, which are refused.
    """
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    hits: Counter = Counter()
    stray: Counter = Counter()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"
        server_version = "toy-pool"
        sys_version = ""

        def _answer(self, with_body: bool):
            url = self.path
            if not url.startswith("http://"):
                url = f"http://{self.headers.get('Host', '')}{url}"
            with lock:
                hits[url] += 1
            status, ctype, body = routes.get(url, (404, "text/html", b"<html><body>Not Found</body></html>\n"))
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            self._answer(True)

        def do_HEAD(self):  # noqa: N802
            self._answer(False)

        def do_CONNECT(self):  # noqa: N802 - an https request: refused, and reported by the build
            with lock:
                stray[self.path] += 1
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format, *args):  # noqa: A002 - silent
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="toy-pool-server", daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host}:{port}", hits, stray
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def _patched_environ(values: dict[str, Optional[str]]):
    """Set (or, for None, remove) environment variables, and put them back afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _fd_output_to(path: Optional[str]):
    """Send file descriptors 1 and 2 (this process and the children it starts) to ``path``."""
    if path is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - a closed stream must not hide the real error
            pass
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in saved + [fd]:
            os.close(f)


def _run_img2dataset(metadata_dir: Path, shards_dir: Path, samples_per_shard: int, proxy: str,
                     progress: bool) -> dict:
    """Call img2dataset.download as download_upstream.py does; returns the settings used."""
    settings = dict(_IMG2DATASET_SETTINGS)
    settings.update(
        url_list=str(metadata_dir),
        output_folder=str(shards_dir),
        save_additional_columns=["uid"],  # a fresh list: img2dataset appends bbox_col to it
        number_sample_per_shard=samples_per_shard,
    )
    # Every request img2dataset (or anything it imports) makes goes to the loopback server:
    # http through it, https refused by it. No W&B, no albumentations version check (an https call
    # to PyPI at import time, in this process and in each worker).
    env = {
        "http_proxy": proxy, "HTTP_PROXY": proxy,
        "https_proxy": proxy, "HTTPS_PROXY": proxy,
        "all_proxy": None, "ALL_PROXY": None,
        "no_proxy": None, "NO_PROXY": None,
        "WANDB_MODE": "disabled", "WANDB_SILENT": "true", "WANDB_DISABLED": "true",
        "NO_ALBUMENTATIONS_UPDATE": "1",
    }
    log = None
    if not progress:
        fd, log = tempfile.mkstemp(prefix="toy_pool_img2dataset_", suffix=".log")
        os.close(fd)
    old_sigint = signal.getsignal(signal.SIGINT)
    try:
        with _patched_environ(env), _fd_output_to(log):
            with warnings.catch_warnings():  # img2dataset 1.47 imports the deprecated imghdr
                warnings.filterwarnings("ignore", message=".*imghdr", category=DeprecationWarning)
                import img2dataset

            img2dataset.download(**settings)
    except Exception as e:
        tail = ""
        if log is not None:
            with open(log, "rb") as f:
                tail = f.read()[-2000:].decode("utf-8", "replace")
        raise RuntimeError(f"img2dataset.download failed: {e}\n{tail}") from e
    finally:
        with contextlib.suppress(ValueError, TypeError):  # only the main thread may set handlers
            signal.signal(signal.SIGINT, old_sigint if old_sigint is not None else signal.SIG_DFL)
        if log is not None:
            with contextlib.suppress(OSError):
                os.unlink(log)
    settings["save_additional_columns"] = ["uid"]
    settings.pop("url_list")
    settings.pop("output_folder")
    settings["img2dataset_version"] = _version("img2dataset")
    return settings


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------------------
# CLIP scores
# ---------------------------------------------------------------------------------------------

# DataComp's columns were made with OpenAI's ViT-B/32 and ViT-L/14.
_ARCHS = {
    "clip_b32_similarity_score": "ViT-B-32",
    "clip_l14_similarity_score": "ViT-L-14",
}


def _clip_columns(clip: str, seed: int, pictures: list, texts: list[str]) -> tuple[dict, dict]:
    """Score every row whose picture decoded; returns ({column: [float|None]}, {column: provenance})."""
    n = len(texts)
    columns = {c: [None] * n for c in _ARCHS}
    if clip == "none":
        return columns, {c: "none" for c in columns}
    from .clip import ClipScorer

    idx = [i for i, p in enumerate(pictures) if p is not None]
    provenance = {}
    for k, (column, arch) in enumerate(_ARCHS.items()):
        scorer = ClipScorer(arch, "tiny" if clip == "tiny" else "openai", seed=seed + k, batch_size=32)
        provenance[column] = scorer.description
        for i, v in zip(idx, scorer.score([pictures[i] for i in idx], [texts[i] for i in idx])):
            columns[column][i] = float(v)
        del scorer
    return columns, provenance


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


def _metadata_schema():
    import pyarrow as pa

    return pa.schema([
        ("uid", pa.string()),
        ("url", pa.string()),
        ("text", pa.string()),
        ("original_width", pa.int64()),
        ("original_height", pa.int64()),
        ("clip_b32_similarity_score", pa.float32()),
        ("clip_l14_similarity_score", pa.float32()),
        ("face_bboxes", pa.list_(pa.list_(pa.float64()))),
        ("sha256", pa.string()),
    ])


def _metadata_stems() -> list[str]:
    """Two 32-hex file stems, in the order img2dataset reads them (sorted)."""
    return sorted(hashlib.md5(f"datacomp-sieve toy pool metadata part {i}".encode(),
                              usedforsecurity=False).hexdigest() for i in range(2))


def _check_out_dir(out_dir: Path) -> bool:
    """Raise UserError for an unusable out_dir; True when it exists already (empty)."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise UserError(f"{out_dir} exists and is not a folder")
        if any(out_dir.iterdir()):
            raise UserError(f"{out_dir} exists and is not empty; give a new or empty folder")
        return True
    if not out_dir.parent.exists():
        raise UserError(f"{out_dir.parent} does not exist")
    return False


def _read_shards(shards_dir: Path):
    """img2dataset's per-row results (by uid) and summed stats from the shard folder."""
    import pyarrow.parquet as pq

    results: dict[str, dict] = {}
    stats = Counter()
    shards = sorted(p.name[: -len(".tar")] for p in shards_dir.glob("*.tar"))
    for shard in shards:
        t = pq.read_table(shards_dir / f"{shard}.parquet",
                          columns=["uid", "key", "status", "error_message"]).to_pylist()
        for r in t:
            if r["uid"] in results:
                raise RuntimeError(f"uid {r['uid']} appears twice in the shard tables")
            results[r["uid"]] = dict(r, shard=f"{shard}.tar")
        with open(shards_dir / f"{shard}_stats.json") as f:
            s = json.load(f)
        for k in ("count", "successes", "failed_to_download", "failed_to_resize"):
            stats[k] += int(s[k])
    return shards, results, stats


def build_toy_pool(out_dir, *, clip: str = "none", samples_per_shard: int = 40, seed: int = 0,
                   progress: bool = True) -> dict:
    """Build the toy pool under ``out_dir`` (new or empty); returns a summary dict.

    clip: "none" (both CLIP columns null), "tiny" (two tiny random open_clip models, seeded with
    ``seed``; real computations, meaningless values) or "openai" (OpenAI ViT-B/32 and ViT-L/14,
    only where the weights are cached locally). samples_per_shard: img2dataset's
    number_sample_per_shard (DataComp uses 10000). progress: let img2dataset print its progress
    (else its output is swallowed and shown only when it fails).
    """
    t0 = time.time()
    if clip not in CLIP_MODES:
        raise UserError(f"clip must be one of {', '.join(CLIP_MODES)}, not {clip!r}")
    if isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise UserError(f"samples_per_shard must be a positive integer, not {samples_per_shard!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"seed must be an integer, not {seed!r}")
    out_dir = Path(out_dir).expanduser().resolve()
    existed = _check_out_dir(out_dir)
    if clip == "openai":  # fail before any work when the weights are not there
        from .clip import openai_checkpoint as _openai_checkpoint

        for arch in _ARCHS.values():
            if _openai_checkpoint(arch) is None:
                raise UserError(
                    f"the openai CLIP needs OpenAI's {arch} weights in a local cache (open_clip's hf-hub or "
                    f"~/.cache/clip); none found, and this build does not download; use tiny or none"
                )

    def say(msg: str) -> None:
        if progress:
            print(f"[toy_pool] {msg}", file=sys.stderr, flush=True)

    created: list[Path] = []
    try:
        out_dir.mkdir(exist_ok=True)
        rows = _plan_rows()
        say(f"encoding pictures for {len(rows)} rows")
        routes = _served_bodies(rows)
        bodies = [routes.get(r.url, (404, "", None)) for r in rows]

        pictures, sizes, shas = [], [], []
        for status, _, body in bodies:
            ok = status == 200 and body is not None
            shas.append(hashlib.sha256(body).hexdigest() if ok else None)
            sizes.append(_open_image(body, full=False) if ok else None)
            pictures.append(_open_image(body, full=True) if ok else None)

        say(f"CLIP columns: {clip}")
        clip_cols, clip_provenance = _clip_columns(clip, seed, pictures, [r.text for r in rows])
        del pictures

        import pyarrow as pa
        import pyarrow.parquet as pq

        metadata_dir = out_dir / "metadata"
        metadata_dir.mkdir()
        created.append(metadata_dir)
        records = [
            {
                "uid": r.uid,
                "url": r.url,
                "text": r.text,
                "original_width": None if sz is None else int(sz[0]),
                "original_height": None if sz is None else int(sz[1]),
                "clip_b32_similarity_score": clip_cols["clip_b32_similarity_score"][i],
                "clip_l14_similarity_score": clip_cols["clip_l14_similarity_score"][i],
                "face_bboxes": [list(b) for b in r.face_bboxes],
                "sha256": sha,
            }
            for i, (r, sz, sha) in enumerate(zip(rows, sizes, shas))
        ]
        stems = _metadata_stems()
        cut = min(_FIRST_FILE_ROWS, len(records))
        parts = [(stems[0], 0, cut), (stems[1], cut, len(records))]
        file_of_row = {}
        for stem, a, b in parts:
            pq.write_table(pa.Table.from_pylist(records[a:b], schema=_metadata_schema()),
                           metadata_dir / f"{stem}.parquet")
            for r in rows[a:b]:
                file_of_row[r.uid] = f"{stem}.parquet"

        shards_dir = out_dir / "shards"
        created.append(shards_dir)
        say(f"serving on 127.0.0.1 and downloading with img2dataset {_version('img2dataset')}")
        with _loopback_server(routes) as (proxy, hits, stray):
            settings = _run_img2dataset(metadata_dir, shards_dir, samples_per_shard, proxy, progress)
        if not hits:
            raise RuntimeError("img2dataset's requests never reached the loopback server")
        if stray:
            warnings.warn(f"toy pool: https requests were attempted (and refused) during the download: "
                          f"{sorted(stray)}", RuntimeWarning, stacklevel=2)

        leftovers = [p.name for p in shards_dir.iterdir()
                     if not (p.suffix in (".tar", ".parquet") or p.name.endswith("_stats.json"))]
        for name in leftovers:  # img2dataset's _tmp folder, should it survive
            target = shards_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()

        shards, results, stats = _read_shards(shards_dir)
        missing = [r.uid for r in rows if r.uid not in results]
        if missing:
            raise RuntimeError(f"img2dataset wrote no result for {len(missing)} rows (first: {missing[0]})")

        failures = Counter()
        unexpected = []
        manifest_rows = []
        for i, r in enumerate(rows):
            res = results[r.uid]
            if res["status"] != "success":
                failures[f"{res['status']}: {res['error_message']}"] += 1
            if res["status"] != r.expected_status:
                unexpected.append({"uid": r.uid, "category": r.category, "expected": r.expected_status,
                                   "got": res["status"], "error_message": res["error_message"]})
            status, ctype, body = bodies[i]
            manifest_rows.append({
                "uid": r.uid,
                "url": r.url,
                "text": r.text,
                "photo": r.photo,
                "category": r.category,
                "metadata_file": file_of_row[r.uid],
                "served": {"http_status": status, "content_type": ctype or None,
                           "bytes": None if body is None else len(body), "sha256": shas[i]},
                "expected_status": r.expected_status,
                "status": res["status"],
                "error_message": res["error_message"],
                "key": res["key"],
                "shard": res["shard"],
                "has_face_bbox": bool(r.face_bboxes),
            })
        if unexpected:
            warnings.warn(f"toy pool: {len(unexpected)} rows did not download as expected: {unexpected}",
                          RuntimeWarning, stacklevel=2)

        photos = {}
        for p in _PHOTOS + (_HUGE_PHOTO,):
            photos[p.name] = {"source": p.source, "encoding": p.encoding, "aligned_text": p.aligned}

        files = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
        files.append(MANIFEST_NAME)
        summary = {
            "out_dir": str(out_dir),
            "rows": len(rows),
            "metadata_files": [f"metadata/{stem}.parquet" for stem, _, _ in parts],
            "shards": [f"shards/{s}.tar" for s in shards],
            "successes": stats["successes"],
            "failed_to_download": stats["failed_to_download"],
            "failed_to_resize": stats["failed_to_resize"],
            "failures_by_reason": dict(sorted(failures.items())),
            "unexpected": unexpected,
            "refused_https": sorted(stray),
            "categories": dict(sorted(Counter(r.category for r in rows).items())),
            "clip": clip,
            "clip_provenance": clip_provenance,
            "files_written": sorted(files),
            "seconds": round(time.time() - t0, 2),
        }
        manifest = {
            "what": (
                "datacomp-sieve toy pool: real photos shipped in scikit-image, scikit-learn and matplotlib, "
                "hand-written alt-texts, served from a loopback HTTP server and downloaded with "
                "img2dataset.download using DataComp's download_upstream.py settings (except "
                "number_sample_per_shard, processes and threads). Small, for tests; not a sample of DataComp."
            ),
            "manifest_version": MANIFEST_VERSION,
            "layout": {"metadata": "metadata/<32-hex>.parquet", "shards": "shards/{:08d}.tar, "
                       "{:08d}.parquet, {:08d}_stats.json"},
            "categories": {
                "aligned": "a plain true description of the photo",
                "misaligned": "another photo's aligned text",
                "medium_phrase": "the aligned text wrapped in a medium phrase (a photo of, stock photo, ...)",
                "hard": "true, but unusual wording (names, jargon, emoji, another language)",
                "broken:<reason>": "a URL or text that is broken on purpose; see expected_status",
            },
            "img2dataset": settings,
            "clip": {"mode": clip, "seed": seed if clip == "tiny" else None, **clip_provenance},
            "counts": {k: summary[k] for k in ("rows", "successes", "failed_to_download", "failed_to_resize",
                                               "failures_by_reason", "categories")},
            "photos": photos,
            "rows": manifest_rows,
        }
        with open(out_dir / MANIFEST_NAME, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, ensure_ascii=False)
            f.write("\n")
        created.append(out_dir / MANIFEST_NAME)
        summary["seconds"] = round(time.time() - t0, 2)
        say(f"done in {summary['seconds']} s: {summary['successes']}/{summary['rows']} downloaded, "
            f"{len(shards)} shards")
        return summary
    except BaseException:
        # leave no half-built pool behind: remove what this call created
        for p in created:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()
        if not existed:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def load_manifest(pool_dir) -> dict:
    """The pool's manifest (see the module docstring)."""
    path = Path(pool_dir) / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"{path} does not exist; is {pool_dir} a toy pool?")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def rows_by_uid(pool_dir) -> dict[str, dict]:
    """The manifest's rows keyed by uid: photo, category, text, status, shard, ..."""
    return {r["uid"]: r for r in load_manifest(pool_dir)["rows"]}
