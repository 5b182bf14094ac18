"""BLIP's caption sampling, with the work shared where the reference repeats it.

``FastBlipSampler`` draws from the same distribution as the reference's call (transformers'
``generate`` with top-k 50, top-p 0.9, repetition penalty 1.1, min/max length counted with the
prompt, [SEP] ends a row, [PAD] after it) and differs only in how the numbers are computed:

- the image's cross-attention keys and values are computed once per image and attended by the
  image's r sequences together, instead of repeating the image r times;
- the prompt ("[DEC] a picture of") runs once per image; its keys and values are copied to the
  image's r sequences;
- keys and values of generated tokens go into a cache allocated once, written in place;
- top-p and the draw work on the 50 candidates top-k keeps (every other token has probability 0
  there), so sorting, softmax and sampling cost 50 entries per row instead of the vocabulary;
- images whose r rows have all ended leave the batch (when a quarter of it has), and the loop
  stops as soon as every row has ended.

The random draws are consumed differently (one multinomial over 50 candidates per row and step),
so captions for a seed differ from the reference path's; their distribution does not. With
``sample=False`` (greedy) the tokens equal transformers' greedy tokens. One detail: top-k keeps
exactly 50 candidates, where transformers also keeps tokens tied with the 50th logit.

Everything but attention reuses the model's own modules (embeddings, dense layers, layer norms,
the LM head), so weights, activations and dtypes are the model's.
"""

from __future__ import annotations

import math


def _split(x, heads: int):
    """(N, T, D) -> (N, heads, T, D / heads)."""
    n, t, _ = x.shape
    return x.view(n, t, heads, -1).transpose(1, 2)


def _merge(x):
    """(N, heads, T, d) -> (N, T, heads * d)."""
    n, h, t, d = x.shape
    return x.transpose(1, 2).reshape(n, t, h * d)


def _attend(q, k, v, causal: bool = False, fused: bool = False):
    """Softmax attention: torch's fused kernel, or the model's own formula (matmul, scale, softmax,
    matmul), whose fp32 results match the model's bit for bit."""
    import torch

    if fused:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        t = q.shape[-2]
        mask = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)
    return torch.matmul(scores.softmax(-1), v)


class FastBlipSampler:
    """Samples r token rows per image from a transformers ``BlipTextLMHeadModel``."""

    #: compact the batch (drop images whose r captions have all ended) when at most this share
    #: of its images is still running
    compact_below = 0.75
    #: torch's fused attention kernel (None: on GPUs; the CPU uses the model's own formula)
    fused_attention: bool | None = None

    def __init__(self, text_decoder, settings, prompt_ids, sep_id: int, pad_id: int):
        self.lm = text_decoder
        self.bert = text_decoder.bert
        self.heads = text_decoder.config.num_attention_heads
        self.settings = settings
        self.prompt_ids = prompt_ids
        self.sep_id, self.pad_id = sep_id, pad_id

    # -- the decoder ---------------------------------------------------------------------------

    def _embed(self, ids, start: int):
        import torch

        emb = self.bert.embeddings
        pos = torch.arange(start, start + ids.shape[1], device=ids.device)
        x = emb.word_embeddings(ids) + emb.position_embeddings(pos)[None]
        return emb.LayerNorm(x)

    def _cross(self, image_embeds):
        """Per layer: the image's cross-attention keys and values, (B, heads, patches, d)."""
        out = []
        for layer in self.bert.encoder.layer:
            ca = layer.crossattention.self
            out.append((_split(ca.key(image_embeds), self.heads), _split(ca.value(image_embeds), self.heads)))
        return out

    def _layers(self, x, cross, cache, pos: int, r: int):
        """Run every layer on x (N, T, D); N is B (the prompt, T tokens from 0) or B*r (one token
        at ``pos``). Self-attention keys/values are written into ``cache`` (B*r rows)."""
        b = cross[0][0].shape[0]
        n, t, d = x.shape
        fused = self.fused_attention if self.fused_attention is not None else x.device.type != "cpu"
        for layer, (ck, cv), (kc, vc) in zip(self.bert.encoder.layer, cross, cache):
            sa = layer.attention.self
            q, k, v = (_split(f(x), self.heads) for f in (sa.query, sa.key, sa.value))
            if pos == 0:  # the prompt, once per image: attend within it, then copy to the r rows
                ctx = _attend(q, k, v, causal=True, fused=fused)
                kc[:, :, :t] = k.repeat_interleave(r, 0)
                vc[:, :, :t] = v.repeat_interleave(r, 0)
            else:
                kc[:, :, pos] = k[:, :, 0]
                vc[:, :, pos] = v[:, :, 0]
                ctx = _attend(q, kc[:, :, :pos + 1], vc[:, :, :pos + 1], fused=fused)
            x = layer.attention.output(_merge(ctx), x)
            # cross-attention: the rows of one image are consecutive; attend as one query block
            qc = layer.crossattention.self.query(x).reshape(b, (n // b) * t, d)
            ctx = _merge(_attend(_split(qc, self.heads), ck, cv, fused=fused)).reshape(n, t, d)
            x = layer.crossattention.output(ctx, x)
            x = layer.output(layer.intermediate(x), x)
        return x

    # -- the sampling ---------------------------------------------------------------------------

    def candidates(self, logits, seen, cur_len: int):
        """The reference's logits processing on float32 logits (N, V) of rows whose tokens so far
        are ``seen``: (probabilities (N, k), token ids (N, k)) of the top-k candidates after
        repetition penalty, min length, temperature and top-p; the other tokens have probability 0."""
        s = self.settings
        logits = self._penalised(logits, seen, cur_len)
        if s.temperature != 1.0:
            logits = logits / s.temperature
        vals, idx = logits.topk(min(s.top_k, logits.shape[-1]) if s.top_k else logits.shape[-1])  # descending
        # top-p as transformers does it: ascending cumulative probabilities, drop those <= 1 - top_p,
        # always keep the most probable token
        cum = vals.flip(-1).softmax(-1).cumsum(-1)
        drop = cum <= 1 - s.top_p
        drop[:, -1] = False
        return vals.masked_fill(drop.flip(-1), -math.inf).softmax(-1), idx

    def _penalised(self, logits, seen, cur_len: int):
        """Repetition penalty over every token so far (prompt included), [SEP] banned below min_length."""
        import torch

        s = self.settings
        score = logits.gather(1, seen)
        logits.scatter_(1, seen, torch.where(score < 0, score * s.repetition_penalty, score / s.repetition_penalty))
        if cur_len < s.min_length:
            logits[:, self.sep_id] = -math.inf
        return logits

    def _next(self, logits, seen, cur_len: int, sample: bool):
        import torch

        if not sample:
            return self._penalised(logits, seen, cur_len).argmax(-1)
        probs, idx = self.candidates(logits, seen, cur_len)
        return idx.gather(1, torch.multinomial(probs, 1)).squeeze(1)

    def generate(self, image_embeds, r: int, sample: bool = True):
        """Token ids (B*r, L): prompt included, r consecutive rows per image, [PAD] after [SEP],
        L the length at which the last row ended (at most max_length). Uses torch's global RNG."""
        import torch

        s = self.settings
        dev = image_embeds.device
        b = image_embeds.shape[0]
        n = b * r
        prompt = self.prompt_ids.to(dev)
        p = prompt.shape[0]
        if s.max_length <= p:
            return prompt.repeat(n, 1)
        cross = self._cross(image_embeds)
        d = self.lm.config.hidden_size
        shape = (n, self.heads, s.max_length, d // self.heads)
        cache = [(image_embeds.new_empty(shape), image_embeds.new_empty(shape)) for _ in cross]

        x = self._layers(self._embed(prompt[None].expand(b, p), 0), cross, cache, 0, r)
        logits = self.lm.cls(x[:, -1]).float().repeat_interleave(r, 0)
        out = torch.full((n, s.max_length), self.pad_id, dtype=torch.long, device=dev)
        out[:, :p] = prompt
        ids = out  # the rows still computed: those of images with a caption still running
        rows = None  # their indices in ``out`` (None: all)
        running = torch.ones(n, dtype=torch.bool, device=dev)
        for cur in range(p, s.max_length):
            nxt = self._next(logits, ids[:, :cur], cur, sample)
            nxt = torch.where(running, nxt, self.pad_id)
            ids[:, cur] = nxt
            running &= nxt != self.sep_id
            if rows is not None:
                out[rows, cur] = nxt
            images = running.view(-1, r).any(1)
            left = int(images.sum())
            if cur + 1 == s.max_length or left == 0:
                return out[:, :cur + 1]
            if left <= self.compact_below * images.shape[0]:
                # drop the images whose captions have all ended (an image's rows stay together)
                keep = images.nonzero().squeeze(1)
                keep_rows = (keep[:, None] * r + torch.arange(r, device=dev)).reshape(-1)
                rows = keep_rows if rows is None else rows[keep_rows]
                cross = [(k[keep], v[keep]) for k, v in cross]
                cache = [(k[keep_rows], v[keep_rows]) for k, v in cache]
                ids, running, nxt = ids[keep_rows], running[keep_rows], nxt[keep_rows]
            x = self._layers(self._embed(nxt[:, None], cur), cross, cache, cur, r)
            logits = self.lm.cls(x[:, -1]).float()
        return out
