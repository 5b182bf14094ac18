"""Salesforce's original BLIP checkpoints, converted to transformers' ``BlipForConditionalGeneration``.

The reference Sieve code builds ``blip_decoder(vit='base', image_size=224)`` from the original BLIP
repository and loads ``model_base_14M.pth`` into it. That checkpoint is BLIP's *pretraining*
checkpoint: besides the captioning decoder it holds the ITC/ITM parts (momentum encoders, text
encoder, projections, queues). The decoder uses only two groups of keys:

- ``visual_encoder.*``: BLIP's ViT-B/16 (timm-style names: ``patch_embed.proj``, ``cls_token``,
  ``pos_embed``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``);
- ``text_decoder.*``: BLIP's ``BertLMHeadModel`` (``bert.embeddings``, ``bert.encoder.layer.N`` with
  self-attention, cross-attention and feed-forward, ``cls.predictions``).

transformers' port keeps the same tensor layouts (its vision attention also holds one fused ``qkv``
projection in the same (q, k, v) x heads order, and the text side was ported from BLIP's ``med.py``
with the same names), so the conversion is a renaming plus three details:

- the position embedding is interpolated (bicubic, as BLIP's ``interpolate_pos_embed``) when the
  requested image size differs from the checkpoint's grid (never for the 224 px Sieve setting);
- the LM head is tied: ``cls.predictions.decoder.weight`` is the word embedding and
  ``cls.predictions.decoder.bias`` is ``cls.predictions.bias``. Both names are in the original
  file (one shared tensor); we fill the canonical parameter and check the alias is equal. Should they
  differ, the alias wins, as it does when BLIP's own ``load_state_dict`` copies both into one tensor;
- ``*.embeddings.position_ids`` buffers and the pretraining-only parts are left out, by name
  (``IGNORED_PREFIXES`` / ``IGNORED_KEYS``); any other unknown key is an error.

Loading uses ``torch.load(weights_only=True)`` only: the file is a pickle from the web, and there is
no fallback to an unrestricted load. Converted weights are cached as safetensors under
``default_cache_dir()``, keyed by the source file's sha256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from .errors import UserError, error_line, one_line

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration

log = logging.getLogger(__name__)

#: Bump when the conversion changes: cached files of another version are not reused.
CONVERSION_VERSION = 1

BLIP_URL_BASE = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/"


@dataclass(frozen=True)
class CheckpointInfo:
    name: str
    url: str
    description: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


#: The original checkpoints the Sieve paper compares (Table 2); 14M is the reference default.
BLIP_CHECKPOINTS: dict[str, CheckpointInfo] = {
    "blip-base-14m": CheckpointInfo(
        "blip-base-14m",
        BLIP_URL_BASE + "model_base_14M.pth",
        "BLIP ViT-B/16, pretrained on 14M image-text pairs (Sieve's reference captioner)",
    ),
    "blip-base-129m": CheckpointInfo(
        "blip-base-129m",
        BLIP_URL_BASE + "model_base.pth",
        "BLIP ViT-B/16, pretrained on 129M image-text pairs (CapFilt-L)",
    ),
}

#: Original keys that the captioning decoder does not use (BLIP pretraining / retrieval parts).
IGNORED_PREFIXES: tuple[str, ...] = (
    "visual_encoder_m.",
    "text_encoder.",
    "text_encoder_m.",
    "vision_proj.",
    "vision_proj_m.",
    "text_proj.",
    "text_proj_m.",
    "itm_head.",
)
IGNORED_KEYS: frozenset[str] = frozenset(
    {
        "temp",
        "image_queue",
        "text_queue",
        "queue_ptr",
        "idx_queue",
        "ptr_queue",
        # a persistent buffer in BLIP's med.py (torch 1.x); transformers rebuilds it
        "text_decoder.bert.embeddings.position_ids",
    }
)

#: Tied aliases in the original decoder: alias key -> canonical original key.
TIED_ALIASES: dict[str, str] = {
    "text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight",
    "text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias",
}


def blip_base_config(image_size: int = 224) -> "BlipConfig":
    """transformers config equal to ``blip_decoder(vit='base')`` with BLIP's ``med_config.json``."""
    return _blip_config(
        vision=dict(
            hidden_size=768,
            intermediate_size=3072,  # mlp_ratio 4
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=image_size,
            patch_size=16,
            hidden_act="gelu",  # nn.GELU (exact erf form)
            layer_norm_eps=1e-6,  # BLIP's ViT: partial(nn.LayerNorm, eps=1e-6)
        ),
        text=dict(
            vocab_size=30524,  # bert-base-uncased + [DEC] + [ENC]
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=512,
            hidden_act="gelu",
            layer_norm_eps=1e-12,
        ),
    )


def tiny_blip_config(image_size: int = 64) -> "BlipConfig":
    """A tiny config with the real tokenizer layout (30,524 tokens), for tests and dry runs."""
    return _blip_config(
        vision=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=16,
            hidden_act="gelu",
            layer_norm_eps=1e-6,
        ),
        text=dict(
            vocab_size=30524,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            hidden_act="gelu",
            layer_norm_eps=1e-12,
        ),
    )


def _blip_config(vision: dict, text: dict) -> "BlipConfig":
    from transformers import BlipConfig

    text = dict(
        text,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        bos_token_id=30522,  # [DEC]
        pad_token_id=0,  # [PAD]
        sep_token_id=102,  # [SEP], BLIP's end of caption
        eos_token_id=102,
        is_decoder=True,
        tie_word_embeddings=True,
    )
    return BlipConfig(text_config=text, vision_config=dict(vision, attention_dropout=0.0))


# --------------------------------------------------------------------------------------------
# Key mapping


def original_to_hf_key_map(vision_layers: int, text_layers: int) -> dict[str, str]:
    """Original BLIP ``blip_decoder`` key -> transformers ``BlipForConditionalGeneration`` key.

    Canonical keys only: the tied aliases are in ``TIED_ALIASES``.
    """
    m: dict[str, str] = {}
    ve, hv = "visual_encoder.", "vision_model."
    m[ve + "cls_token"] = hv + "embeddings.class_embedding"
    m[ve + "pos_embed"] = hv + "embeddings.position_embedding"
    for p in ("weight", "bias"):
        m[f"{ve}patch_embed.proj.{p}"] = f"{hv}embeddings.patch_embedding.{p}"
        m[f"{ve}norm.{p}"] = f"{hv}post_layernorm.{p}"
    block_parts = {
        "norm1": "layer_norm1",
        "attn.qkv": "self_attn.qkv",
        "attn.proj": "self_attn.projection",
        "norm2": "layer_norm2",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    for i in range(vision_layers):
        for orig, hf in block_parts.items():
            for p in ("weight", "bias"):
                m[f"{ve}blocks.{i}.{orig}.{p}"] = f"{hv}encoder.layers.{i}.{hf}.{p}"

    # The text side keeps BLIP's med.py names one to one.
    td = "text_decoder."
    text_keys = [
        "bert.embeddings.word_embeddings.weight",
        "bert.embeddings.position_embeddings.weight",
        "bert.embeddings.LayerNorm.weight",
        "bert.embeddings.LayerNorm.bias",
        "cls.predictions.bias",
    ]
    for part in ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm"):
        text_keys += [f"{part}.weight", f"{part}.bias"]
    layer_parts = []
    for att in ("attention", "crossattention"):
        layer_parts += [f"{att}.self.query", f"{att}.self.key", f"{att}.self.value"]
        layer_parts += [f"{att}.output.dense", f"{att}.output.LayerNorm"]
    layer_parts += ["intermediate.dense", "output.dense", "output.LayerNorm"]
    for i in range(text_layers):
        for part in layer_parts:
            for p in ("weight", "bias"):
                text_keys.append(f"bert.encoder.layer.{i}.{part}.{p}")
    for k in text_keys:
        m[td + k] = td + k
    return m


@dataclass
class Conversion:
    """Result of ``convert_state_dict``."""

    state_dict: dict  # HF key -> tensor (canonical keys: no tied aliases)
    sources: dict[str, str]  # HF key -> the original key it came from
    ignored: list[str] = field(default_factory=list)  # original keys deliberately left out
    aliases_checked: list[str] = field(default_factory=list)  # tied alias keys found equal
    notes: list[str] = field(default_factory=list)


def is_ignored_key(key: str) -> bool:
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES) or key.endswith(".position_ids")


def unwrap_checkpoint(obj) -> dict:
    """The state dict inside a BLIP checkpoint (``{'model': ...}``; bare dicts and DDP prefixes too)."""
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    elif isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise UserError(f"not a BLIP checkpoint: expected a dict of tensors, found {type(obj).__name__}")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def interpolate_pos_embed(pos_embed: "torch.Tensor", num_patches: int) -> "torch.Tensor":
    """Resize a (1, 1 + g*g, D) ViT position embedding to ``num_patches`` patches.

    Same rule as BLIP's ``interpolate_pos_embed``: the class token's entry is kept, the g x g grid
    is resized bicubically (align_corners=False). Unchanged when the grid already fits.
    """
    import torch

    extra = 1
    old = pos_embed.shape[-2] - extra
    old_size, new_size = math.isqrt(old), math.isqrt(num_patches)
    if old_size * old_size != old or new_size * new_size != num_patches:
        raise UserError(f"position embedding of {old} patches cannot be resized to {num_patches}")
    if old_size == new_size:
        return pos_embed
    dim = pos_embed.shape[-1]
    dtype = pos_embed.dtype
    grid = pos_embed[:, extra:].float().reshape(1, old_size, old_size, dim).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(new_size, new_size), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2).to(dtype)
    log.info("BLIP position embedding resized from %d to %d patches", old, num_patches)
    return torch.cat([pos_embed[:, :extra], grid], dim=1)


def _expected_hf_shapes(config: "BlipConfig") -> dict[str, tuple]:
    """Shapes of the HF parameters, computed on the meta device (no memory, no init)."""
    import torch
    from transformers import BlipForConditionalGeneration

    with torch.device("meta"):
        model = BlipForConditionalGeneration(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def convert_state_dict(original: Mapping[str, "torch.Tensor"], config: "BlipConfig") -> Conversion:
    """Map an original BLIP (``blip_decoder`` or pretraining) state dict to HF keys.

    Raises ``UserError`` for a missing key, a shape that does not fit ``config``, or a key that is
    neither used nor known to be unused. Every HF parameter is filled from exactly one original key.
    """
    import torch

    vc, tc = config.vision_config, config.text_config
    mapping = original_to_hf_key_map(vc.num_hidden_layers, tc.num_hidden_layers)
    hf_shapes = _expected_hf_shapes(config)
    hf_aliases = {"text_decoder.cls.predictions.decoder.weight", "text_decoder.cls.predictions.decoder.bias"}

    out: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    conv = Conversion(out, sources)

    missing = [k for k in mapping if k not in original]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise UserError(
            f"not a BLIP ViT-B decoder checkpoint for this config: {len(missing)} keys missing, "
            f"e.g. {', '.join(missing[:5])}{more}"
        )
    unknown = [
        k for k in original if k not in mapping and k not in TIED_ALIASES and not is_ignored_key(k)
    ]
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise UserError(
            f"unexpected keys in the BLIP checkpoint (a larger ViT or another model?): "
            f"{', '.join(sorted(unknown)[:5])}{more}"
        )

    for orig_key, hf_key in mapping.items():
        t = original[orig_key]
        if not isinstance(t, torch.Tensor):
            raise UserError(f"BLIP checkpoint entry {orig_key} is not a tensor")
        if hf_key in sources:  # cannot happen with a correct mapping; guards "exactly once"
            raise AssertionError(f"{hf_key} filled twice ({sources[hf_key]}, {orig_key})")
        alias = next((a for a, c in TIED_ALIASES.items() if c == orig_key), None)
        if alias is not None and alias in original:
            a = original[alias]
            if a.shape != t.shape:
                raise UserError(f"tied weights {orig_key} and {alias} have different shapes")
            if torch.equal(a, t):
                conv.aliases_checked.append(alias)
            else:
                # BLIP's load_state_dict copies both names into one tensor; the alias comes last.
                conv.notes.append(f"{alias} differs from {orig_key}; using {alias} as BLIP's loader does")
                log.warning(conv.notes[-1])
                t, orig_key = a, alias
        if hf_key == "vision_model.embeddings.position_embedding":
            want = hf_shapes[hf_key]
            if t.ndim == 3 and t.shape[-1] == want[-1] and t.shape != want:
                t = interpolate_pos_embed(t, want[1] - 1)
                conv.notes.append(f"pos_embed resized to {want[1] - 1} patches")
        if tuple(t.shape) != hf_shapes[hf_key]:
            hint = ""
            if hf_key.endswith("word_embeddings.weight"):
                hint = " (BLIP's vocabulary is bert-base-uncased plus [DEC] and [ENC]: 30524 rows)"
            raise UserError(
                f"BLIP checkpoint tensor {orig_key} has shape {tuple(t.shape)}, "
                f"the model needs {hf_shapes[hf_key]} for {hf_key}{hint}"
            )
        out[hf_key] = t
        sources[hf_key] = orig_key

    conv.ignored = sorted(k for k in original if is_ignored_key(k))
    # Every HF tensor is filled: all keys except the tied aliases, which share the canonical tensors.
    left = set(hf_shapes) - set(out) - hf_aliases
    if left:
        raise AssertionError(f"conversion left HF keys unfilled: {sorted(left)[:5]}")
    return conv


def build_model_from_state_dict(config: "BlipConfig", state_dict: Mapping[str, "torch.Tensor"]):
    """A ``BlipForConditionalGeneration`` in eval mode holding ``state_dict`` (canonical keys)."""
    import torch
    from transformers import BlipForConditionalGeneration

    with torch.device("meta"):
        model = BlipForConditionalGeneration(config)
    result = model.load_state_dict(dict(state_dict), strict=False, assign=True)
    allowed_missing = {"text_decoder.cls.predictions.decoder.weight", "text_decoder.cls.predictions.decoder.bias"}
    bad_missing = set(result.missing_keys) - allowed_missing
    if bad_missing or result.unexpected_keys:
        raise UserError(
            f"converted BLIP weights do not fit the model: missing {sorted(bad_missing)[:5]}, "
            f"unexpected {sorted(result.unexpected_keys)[:5]}"
        )
    head = model.text_decoder.cls.predictions
    head.decoder.weight = model.text_decoder.bert.embeddings.word_embeddings.weight
    head.decoder.bias = head.bias
    # Non-persistent buffers stay on the meta device after a meta build: rebuild them.
    emb = model.text_decoder.bert.embeddings
    emb.position_ids = torch.arange(emb.position_embeddings.num_embeddings).expand((1, -1))
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise AssertionError(f"{name} was not filled")
    return model.eval()


# --------------------------------------------------------------------------------------------
# Files: load, download, cache


def default_cache_dir() -> Path:
    """``$DATACOMP_SIEVE_CACHE``, else ``$XDG_CACHE_HOME/datacomp_sieve``, else ``~/.cache/datacomp_sieve``."""
    env = os.environ.get("DATACOMP_SIEVE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "datacomp_sieve"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_original_checkpoint(path: str | os.PathLike) -> dict:
    """The original BLIP state dict, read with ``torch.load(weights_only=True)`` and nothing else."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"BLIP checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(
            f"{path} cannot be read with torch.load(weights_only=True), and this tool does not "
            f"unpickle arbitrary objects from downloaded files: {_weights_only_reason(path, e)}"
        ) from None
    except Exception as e:  # noqa: BLE001 - a text file or a cut download fails deep in pickle (KeyError, IndexError, ...)
        raise UserError(f"{path} is not a readable torch checkpoint (truncated download, or another kind of "
                        f"file?): {error_line(e)}") from None
    return unwrap_checkpoint(obj)


def _weights_only_reason(path: Path, error: Exception) -> str:
    """Why the restricted unpickler refused ``path``, in one line: the globals it would need."""
    import torch

    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # older torch, or not a zip checkpoint
        unsafe = []
    if unsafe:
        return f"it references objects outside plain tensors/containers: {', '.join(unsafe[:8])}"
    msg = " ".join(str(error).split())
    m = re.search(r"WeightsUnpickler error: (.*?)(?: Please use| Check the documentation|$)", msg)
    return (m.group(1) if m else msg)[:400]


def _is_url(s: str) -> bool:
    return bool(re.match(r"^https?://", s))


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "DATACOMP_SIEVE_OFFLINE"))


def download_checkpoint(url: str, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Download ``url`` into ``<cache>/downloads/`` (once; atomic rename) and return the local path."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    dest = cache / "downloads" / url.rsplit("/", 1)[-1]
    if dest.is_file():
        return dest
    if _offline():
        raise UserError(
            f"{dest.name} is not in the cache ({dest.parent}) and offline mode is on "
            f"(HF_HUB_OFFLINE / DATACOMP_SIEVE_OFFLINE); {_what_to_do(url, dest)}"
        )
    import torch.hub

    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", url, dest)
    tmp = dest.with_name(dest.name + f".part{os.getpid()}")
    try:
        torch.hub.download_url_to_file(url, str(tmp), progress=progress)
        os.replace(tmp, dest)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not download {url} ({one_line(e)}); {_what_to_do(url, dest)}") from None
    return dest


def _what_to_do(url: str, dest: Path) -> str:
    """What a user without the weights can do, said where the download fails."""
    return (f"download it where there is network and put it at {dest} (or pass --captioner PATH to the file); "
            f"--captioner label is an offline stand-in for trials, not BLIP")


def resolve_source(source: str | os.PathLike, cache_dir=None, progress: bool = True) -> tuple[Path, str]:
    """A registry name, URL or local path -> (local file, display name)."""
    s = str(source)
    if s in BLIP_CHECKPOINTS:
        info = BLIP_CHECKPOINTS[s]
        return download_checkpoint(info.url, cache_dir, progress), info.filename
    if _is_url(s):
        return download_checkpoint(s, cache_dir, progress), s.rsplit("/", 1)[-1]
    p = Path(s).expanduser()
    if not p.is_file():
        raise UserError(
            f"BLIP weights not found: {s} (give a file, a URL, or one of {', '.join(BLIP_CHECKPOINTS)})"
        )
    return p, p.name


def converted_path(cache_dir: Path, sha256: str, image_size: int) -> Path:
    return cache_dir / "blip_hf" / f"{sha256}-{image_size}px-v{CONVERSION_VERSION}.safetensors"


def load_blip_model(
    source: str | os.PathLike,
    image_size: int = 224,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    config: "BlipConfig | None" = None,
) -> tuple["BlipForConditionalGeneration", dict]:
    """A transformers BLIP captioner with original BLIP weights, and where they came from.

    ``source``: ``blip-base-14m`` / ``blip-base-129m`` (downloaded once into the cache), a URL, or
    a local ``.pth``. The first use converts and caches safetensors keyed by the file's sha256;
    later uses read only the safetensors file. ``config`` defaults to ``blip_base_config(image_size)``
    (tests pass a tiny one).
    """
    from safetensors.torch import load_file, save_file

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    path, display = resolve_source(source, cache, progress)
    digest = sha256_file(path)
    config = config if config is not None else blip_base_config(image_size)
    image_size = config.vision_config.image_size
    out = converted_path(cache, digest, image_size)
    info = {"source": display, "sha256": digest, "converted": str(out), "image_size": image_size}
    if out.is_file():
        state = load_file(str(out))
        return build_model_from_state_dict(config, state), info

    original = load_original_checkpoint(path)
    conv = convert_state_dict(original, config)
    del original
    state = {k: v.contiguous() for k, v in conv.state_dict.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".part")
    os.close(fd)
    try:
        save_file(
            state,
            tmp,
            metadata={
                "source": display,
                "source_sha256": digest,
                "conversion_version": str(CONVERSION_VERSION),
                "notes": json.dumps(conv.notes),
            },
        )
        os.replace(tmp, out)
    except OSError as e:  # a read-only cache still gives a working model
        Path(tmp).unlink(missing_ok=True)
        log.warning("could not cache converted BLIP weights at %s: %s", out, e)
    info["notes"] = conv.notes
    return build_model_from_state_dict(config, state), info
