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
- those candidates come from the model's own logits (half precision on GPUs): the repetition
  penalty (1.1; any at least 1) and the min-length ban only lower logits, of at most L + 1
  tokens (the row's L tokens and [SEP]), so the top 50 after them are among the top 50 + L + 1
  before; only those are made float32 and penalised (the same float32 numbers as penalising the
  whole vocabulary), not the (rows, vocabulary) logits (``candidates_first``);
- images whose r rows have all ended leave the batch (when a quarter of it has), and the loop
  stops as soon as every row has ended.

With ``cuda_graphs`` set, the per-token step instead runs on buffers of fixed shape (``_StaticLoop``:
no compaction, self-attention over the whole cache with the slots not yet written masked out,
positions and lengths as device tensors), so that on a GPU a batch's steps are captured once as
a CUDA graph and replayed, one launch per batch instead of hundreds of kernel launches from Python
per token, and no wait of the host between tokens; on the CPU the same steps run as they are
(what the tests check).

The random draws are consumed differently (one draw over 50 candidates per row and step),
so captions for a seed differ from the reference path's; their distribution does not. With
``sample=False`` (greedy) the tokens equal transformers' greedy tokens. One detail: top-k keeps
exactly 50 candidates, where transformers also keeps tokens tied with the 50th logit.

Everything but attention reuses the model's own modules (embeddings, dense layers, layer norms,
the LM head), so weights, activations and dtypes are the model's. ``vision_states`` runs the
image encoder (the ViT) the same way, for the fast path's ``encode_images``.
"""

from __future__ import annotations

import logging
import math

from .errors import first_line

log = logging.getLogger(__name__)


def _split(x, heads: int):
    """(N, T, D) -> (N, heads, T, D / heads)."""
    n, t, _ = x.shape
    return x.view(n, t, heads, -1).transpose(1, 2)


def _merge(x):
    """(N, heads, T, d) -> (N, T, heads * d)."""
    n, h, t, d = x.shape
    return x.transpose(1, 2).reshape(n, t, h * d)


def _attend(q, k, v, causal: bool = False, fused: bool = False, valid=None):
    """Softmax attention: torch's fused kernel, or the model's own formula (matmul, scale, softmax,
    matmul), whose fp32 results match the model's bit for bit. ``valid``: a boolean mask over the
    keys (False: not attended)."""
    import torch

    if fused:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=valid, is_causal=causal)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        t = q.shape[-2]
        mask = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)
    if valid is not None:
        scores = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
    return torch.matmul(scores.softmax(-1), v)


def vision_states(vision, pixel_values, fused: bool = False):
    """BLIP's ViT (transformers' ``BlipVisionModel``: embeddings, pre-norm layers, final layer
    norm) run on its own modules: its last hidden states (B, 1 + patches, D). With ``fused``, the
    attention is torch's fused kernel (no (B, heads, T, T) score tensor in memory); without, the
    model's own formula (matmul, scale, softmax, matmul), whose numbers equal the model's bit for
    bit."""
    import torch

    x = vision.embeddings(pixel_values)
    for layer in vision.encoder.layers:
        attn = layer.self_attn
        b, t, d = x.shape
        qkv = attn.qkv(layer.layer_norm1(x)).reshape(b, t, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if fused:
            ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        else:
            ctx = torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * attn.scale, dim=-1), v)
        x = attn.projection(ctx.permute(0, 2, 1, 3).reshape(b, t, d)) + x
        x = layer.mlp(layer.layer_norm2(x)) + x
    return vision.post_layernorm(x)


class FastBlipSampler:
    """Samples r token rows per image from a transformers ``BlipTextLMHeadModel``."""

    #: compact the batch (drop images whose r captions have all ended) when at most this share
    #: of its images is still running
    compact_below = 0.75
    #: torch's fused attention kernel (None: on GPUs; the CPU uses the model's own formula)
    fused_attention: bool | None = None
    #: the per-token step on fixed-shape buffers, replayed as a CUDA graph on GPUs (module docstring)
    cuda_graphs: bool = False
    #: how many fixed-shape loops (and graphs) are kept, the most recently used
    static_loops_kept = 2
    #: a CUDA graph holds every step of a batch, replayed once per batch, the host waiting only for
    #: the end (False: one step per replay, the host checking after each whether a row is still
    #: running, and stopping when none is). The steps after every row has ended still run: with
    #: thousands of rows per batch, one reaching max_length is enough to need them all (expected
    #: of real captions, not measured)
    graph_whole_loop: bool = True
    #: the fixed-shape loop draws its random numbers for every step of a batch beforehand (so that
    #: no draw happens inside the graph); above this many candidates per row (top-k off or large)
    #: that is too much memory, and ``cuda_graphs`` is ignored
    static_max_candidates = 1024
    #: top-k on the model's logits first, the penalties on those candidates only (module docstring);
    #: False: the whole vocabulary's logits made float32 and penalised, then top-k (the same
    #: numbers); None: first where the logits are half precision (on the CPU's float32 logits the
    #: whole-vocabulary way is faster, measured)
    candidates_first: bool | None = None
    #: the LM head's output padded with never-chosen columns to a multiple of this many tokens
    #: (GPU matrix units want aligned shapes; BLIP's vocabulary is 30,524); 1: not padded; None:
    #: 64 on GPUs, 1 on the CPU
    vocab_multiple: int | None = None
    #: the model's vocabulary (the logits' columns beyond it are padding); None: all of them
    vocab: int | None = None

    def __init__(self, text_decoder, settings, prompt_ids, sep_id: int, pad_id: int):
        self.lm = text_decoder
        self.bert = text_decoder.bert
        self.heads = text_decoder.config.num_attention_heads
        self.vocab = text_decoder.config.vocab_size
        self.settings = settings
        self.prompt_ids = prompt_ids
        self.sep_id, self.pad_id = sep_id, pad_id
        self._loops: dict = {}
        self._head = None  # (key, padded weight, padded bias) for vocab_multiple

    # -- the decoder ---------------------------------------------------------------------------

    def _embed(self, ids, start):
        """Embeddings of ids (N, T) at positions start.. (an int, or a 1-element tensor when T is 1)."""
        import torch

        emb = self.bert.embeddings
        pos = torch.arange(start, start + ids.shape[1], device=ids.device) if isinstance(start, int) else start
        x = emb.word_embeddings(ids) + emb.position_embeddings(pos)[None]
        return emb.LayerNorm(x)

    def _cross(self, image_embeds):
        """Per layer: the image's cross-attention keys and values, (B, heads, patches, d)."""
        out = []
        for layer in self.bert.encoder.layer:
            ca = layer.crossattention.self
            out.append((_split(ca.key(image_embeds), self.heads), _split(ca.value(image_embeds), self.heads)))
        return out

    def _layers(self, x, cross, cache, pos, r: int, valid=None):
        """Run every layer on x (N, T, D); N is B (the prompt, T tokens from 0) or B*r (one token
        at ``pos``). Self-attention keys/values are written into ``cache`` (B*r rows). With
        ``valid`` (a boolean mask over the cache's slots), ``pos`` is a 1-element tensor and the
        token attends to the whole cache, masked: shapes do not depend on the position."""
        b = cross[0][0].shape[0]
        n, t, d = x.shape
        fused = self.fused_attention if self.fused_attention is not None else x.device.type != "cpu"
        for layer, (ck, cv), (kc, vc) in zip(self.bert.encoder.layer, cross, cache):
            sa = layer.attention.self
            q, k, v = (_split(f(x), self.heads) for f in (sa.query, sa.key, sa.value))
            if valid is not None:  # fixed shapes: write at pos, attend to the valid slots
                kc.index_copy_(2, pos, k)
                vc.index_copy_(2, pos, v)
                ctx = _attend(q, kc, vc, fused=fused, valid=valid)
            elif pos == 0:  # the prompt, once per image: attend within it, then copy to the r rows
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

    def _prompt(self, b: int, cross, cache, r: int):
        """The prompt through every layer once per image (its keys/values copied into the cache's
        r rows per image): the logits of the first new token, (B*r, V) (``_logits``)."""
        prompt = self.prompt_ids.to(cross[0][0].device)
        x = self._layers(self._embed(prompt[None].expand(b, prompt.shape[0]), 0), cross, cache, 0, r)
        return self._logits(x[:, -1]).repeat_interleave(r, 0)

    def _logits(self, h):
        """The LM head on hidden states (N, D): logits (N, V) in the model's dtype; with
        ``vocab_multiple`` > 1, (N, V') with V' the next multiple, the added columns -inf (their
        weights zero, their bias -inf: never a candidate)."""
        import torch

        m = self.vocab_multiple
        if m is None:
            m = 1 if h.device.type == "cpu" else 64
        if m <= 1 or self.vocab % m == 0:
            return self.lm.cls(h)
        pred = self.lm.cls.predictions
        dec = pred.decoder
        bias = dec.bias if dec.bias is not None else pred.bias
        # the model's tensors, as they are now (weights changed in place make a new copy; tensors
        # made under inference_mode keep no version)
        key = (dec.weight.data_ptr(), bias.data_ptr(), dec.weight.dtype, m) + tuple(
            None if torch.is_inference(t) else t._version for t in (dec.weight, bias))
        if self._head is None or self._head[0] != key:
            if self._head is not None:
                self._loops.clear()  # their graphs read the copy this one replaces
            width = -(-self.vocab // m) * m
            w = dec.weight.new_zeros(width, dec.weight.shape[1])
            w[:self.vocab] = dec.weight
            b = dec.weight.new_full((width,), -math.inf)
            b[:self.vocab] = bias
            self._head = (key, w, b)
        return torch.nn.functional.linear(pred.transform(h), self._head[1], self._head[2])

    # -- the sampling ---------------------------------------------------------------------------

    def candidates(self, logits, seen, cur_len: int):
        """The reference's logits processing on logits (N, V) (any float dtype; the work is
        float32) of rows whose tokens so far are ``seen``: (probabilities (N, k), token ids (N, k))
        of the top-k candidates after repetition penalty, min length, temperature and top-p; the
        other tokens have probability 0."""
        import torch

        s = self.settings
        vocab = self.vocab or logits.shape[-1]
        width = self._width(vocab)
        more = width + seen.shape[1] + 1  # enough candidates: the penalties lower at most L + 1 tokens
        first = self.candidates_first if self.candidates_first is not None else logits.dtype != torch.float32
        if first and s.top_k and more < vocab and s.repetition_penalty >= 1:  # (below 1 it raises logits)
            vals, idx = logits.topk(more)
            vals = vals.float()
            hit = (idx[:, :, None] == seen[:, None, :]).any(-1)
            vals = torch.where(hit, torch.where(vals < 0, vals * s.repetition_penalty, vals / s.repetition_penalty),
                               vals)
            self._ban_sep(vals, idx == self.sep_id, cur_len)
            if s.temperature != 1.0:
                vals = vals / s.temperature
            vals, at = vals.topk(width)  # descending
            idx = idx.gather(1, at)
        else:
            logits = self._penalised(logits[:, :vocab].float(), seen, cur_len)
            if s.temperature != 1.0:
                logits = logits / s.temperature
            vals, idx = logits.topk(width)  # descending
        # top-p as transformers does it: ascending cumulative probabilities, drop those <= 1 - top_p,
        # always keep the most probable token
        cum = vals.flip(-1).softmax(-1).cumsum(-1)
        drop = cum <= 1 - s.top_p
        drop[:, -1] = False
        return vals.masked_fill(drop.flip(-1), -math.inf).softmax(-1), idx

    def _penalised(self, logits, seen, cur_len: int):
        """Repetition penalty over every token so far (prompt included), [SEP] banned below min_length.
        ``cur_len``: an int, or a 1-element tensor (then the ban is a masked write, no branch)."""
        import torch

        s = self.settings
        score = logits.gather(1, seen)
        logits.scatter_(1, seen, torch.where(score < 0, score * s.repetition_penalty, score / s.repetition_penalty))
        self._ban_sep(logits[:, self.sep_id], None, cur_len)
        return logits

    def _ban_sep(self, values, where, cur_len) -> None:
        """[SEP]'s logits (``where`` marks them in ``values``; None: all of ``values``) set to -inf
        below min_length, in place; ``cur_len`` an int, or a 1-element tensor (a masked write, no
        branch on the host)."""
        below = self.settings.min_length
        if isinstance(cur_len, int):
            if cur_len < below and where is None:
                values.fill_(-math.inf)
            elif cur_len < below:
                values.masked_fill_(where, -math.inf)
        else:
            values.masked_fill_(cur_len < below if where is None else where & (cur_len < below), -math.inf)

    def _width(self, vocab: int) -> int:
        """How many candidates ``candidates`` returns per row."""
        k = self.settings.top_k
        return min(k, vocab) if k else vocab

    def _next(self, logits, seen, cur_len: int, sample: bool, noise=None):
        """The next token of every row. Sampling draws as torch.multinomial(probs, 1) does (the same
        numbers on the CPU, tested): argmax of probs / q, q ~ Exp(1) per candidate; ``noise``: those
        q, drawn beforehand (N, candidates)."""
        import torch

        if not sample:
            return self._penalised(logits[:, :self.vocab].float(), seen, cur_len).argmax(-1)
        probs, idx = self.candidates(logits, seen, cur_len)
        q = torch.empty_like(probs).exponential_() if noise is None else noise
        return idx.gather(1, (probs / q).argmax(-1, keepdim=True)).squeeze(1)

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
        if self.cuda_graphs and self._width(self.vocab) <= self.static_max_candidates:
            return self._generate_static(image_embeds, r, sample)
        cross = self._cross(image_embeds)
        d = self.lm.config.hidden_size
        shape = (n, self.heads, s.max_length, d // self.heads)
        cache = [(image_embeds.new_empty(shape), image_embeds.new_empty(shape)) for _ in cross]

        logits = self._prompt(b, cross, cache, r)
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
            logits = self._logits(x[:, -1])
        return out

    # -- fixed shapes, CUDA graphs ----------------------------------------------------------------

    def _generate_static(self, image_embeds, r: int, sample: bool):
        """``generate`` on a ``_StaticLoop``: rows are never compacted, every step has the same
        shapes; on CUDA the step is a CUDA graph (captured the first time a shape is seen)."""
        # the attention kernel and the step's other choices too: a graph replays what it captured
        key = (tuple(image_embeds.shape), image_embeds.dtype, str(image_embeds.device), r, sample,
               self.fused_attention, self.candidates_first, self.vocab_multiple, self.graph_whole_loop)
        loop = self._loops.pop(key, None)
        if loop is None:
            while len(self._loops) >= self.static_loops_kept:
                self._loops.pop(next(iter(self._loops)))
            loop = _StaticLoop(self, image_embeds, r, sample)
            if any(kept[0][0] > image_embeds.shape[0] for kept in self._loops):  # batch sizes
                # a smaller batch than one kept (a shard's last, its size varying from shard to
                # shard): steps run as they are, the same tokens as a graph's, no capture per size
                loop.use_graph = False
        self._loops[key] = loop  # the most recently used last
        return loop.run(image_embeds)


class _StaticLoop:
    """BLIP's sampling loop on buffers allocated once for one batch shape.

    State between steps lives in the buffers: the cross-attention keys/values, the self-attention
    cache, the token rows (``seen``: slots not yet sampled hold the prompt's first token, which is
    in every row already, so the repetition penalty gathering the whole row sees the same set of
    tokens as the growing rows of ``generate``), which rows are still running, and the position
    (a device tensor); the random numbers of all steps are drawn when a batch is loaded. ``step``
    runs the layers on the last token, then samples the next one; it reads and writes nothing else
    and draws nothing, so a CUDA graph of it can be replayed. The graph holds every step of a
    batch (``FastBlipSampler.graph_whole_loop``): one replay per batch, the rows' length (where
    ``generate`` would have stopped) kept on the device and read once at the end; otherwise it
    holds one step, and after each the host reads whether any row is still running, as
    ``generate`` does."""

    #: replay the step as a CUDA graph (None: on CUDA devices)
    use_graph: bool | None = None

    def __init__(self, sampler: FastBlipSampler, image_embeds, r: int, sample: bool):
        import torch

        self.s, self.r, self.sample = sampler, r, sample
        self.whole = sampler.graph_whole_loop
        dev = image_embeds.device
        b, patches, _ = image_embeds.shape
        n, heads = b * r, sampler.heads
        dh = sampler.lm.config.hidden_size // heads
        length = sampler.settings.max_length
        layers = len(sampler.bert.encoder.layer)
        self.cross = [(image_embeds.new_zeros(b, heads, patches, dh), image_embeds.new_zeros(b, heads, patches, dh))
                      for _ in range(layers)]
        # zeros: slots not yet written are masked out, and must hold finite numbers (0 * nan is nan)
        self.cache = [(image_embeds.new_zeros(n, heads, length, dh), image_embeds.new_zeros(n, heads, length, dh))
                      for _ in range(layers)]
        self.seen = torch.zeros(n, length, dtype=torch.long, device=dev)
        self.running = torch.ones(n, dtype=torch.bool, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        # the length of the rows returned: one past the position after which no row was running
        # (max_length if one always was), kept on the device step by step
        self.stop = torch.zeros(1, dtype=torch.long, device=dev)
        self.slots = torch.arange(length, device=dev)
        self.first = sampler.prompt_ids.shape[0]  # the first sampled position
        #: steps one replay of the graph runs: all of a batch's, or one
        self.replay_steps = max(length - 1 - self.first, 1) if self.whole else 1
        # the random numbers of every step, drawn in ``load``: the same numbers, in the same order,
        # as the growing-shape loop draws step by step (on the CPU; tested)
        width = sampler._width(sampler.vocab)
        self.noise = torch.empty(max(length - self.first, 1), n, width, device=dev) if sample else None
        self.graph = None

    def load(self, image_embeds):
        """This batch: its cross-attention keys/values, the prompt through the layers (once per
        image, copied to its r rows), the first sampled token."""
        s = self.s
        prompt = s.prompt_ids.to(image_embeds.device)
        p = prompt.shape[0]
        for (k, v), (ck, cv) in zip(self.cross, s._cross(image_embeds)):
            k.copy_(ck)
            v.copy_(cv)
        logits = s._prompt(image_embeds.shape[0], self.cross, self.cache, self.r)
        self.seen.fill_(int(s.prompt_ids[0]))
        self.seen[:, :p] = prompt
        self.running.fill_(True)
        self.pos.fill_(p)
        self.stop.fill_(s.settings.max_length)
        if self.noise is not None:
            self.noise.exponential_()
        self._sample(logits)

    def _sample(self, logits):
        """The token at ``pos`` for every row ([PAD] for rows that have ended)."""
        import torch

        s = self.s
        noise = None if self.noise is None else self.noise.index_select(0, self.pos - self.first)[0]
        nxt = s._next(logits, self.seen, self.pos, self.sample, noise)
        nxt = torch.where(self.running, nxt, s.pad_id)
        self.seen.index_copy_(1, self.pos, nxt[:, None])
        self.running &= nxt != s.sep_id
        ended = torch.where(self.running.any(), s.settings.max_length, self.pos + 1)
        torch.minimum(self.stop, ended, out=self.stop)

    def step(self):
        s = self.s
        x = s._layers(s._embed(self.seen.index_select(1, self.pos), self.pos), self.cross, self.cache, self.pos,
                      self.r, valid=(self.slots <= self.pos)[None])
        self.pos += 1
        self._sample(s._logits(x[:, -1]))

    def _steps(self, n: int) -> None:
        for _ in range(n):
            self.step()

    def _capture(self):
        """Record ``replay_steps`` steps as a CUDA graph, after two warm-up steps on a side stream (as
        CUDA graphs need). The step draws no random numbers (they are in ``noise``), so the graph
        holds none."""
        import torch

        dev = self.pos.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.pos.fill_(self.first)  # every step from the first position: all stay in range
                self.step()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.pos.fill_(self.first)
        graph = torch.cuda.CUDAGraph()
        before = torch.cuda.current_stream(dev)
        try:
            # thread_local: the text half may use the GPU from another thread meanwhile
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._steps(self.replay_steps)
        finally:
            # a capture that fails ends in torch's ``capture_end`` raising, which leaves this thread
            # on the capture stream: the steps without a graph, and the batches after, must run on
            # the stream they ran on before (the one the batches are prepared for)
            torch.cuda.set_stream(before)
        self.graph = graph

    def run(self, image_embeds):
        """Token ids (B*r, L) as ``FastBlipSampler.generate`` returns them."""
        import torch

        length = self.s.settings.max_length
        dev = self.pos.device
        graphs = self.use_graph if self.use_graph is not None else dev.type == "cuda"
        if graphs and self.graph is None and length - self.first >= 2:  # at least one step
            # the capture runs on this batch's numbers (loaded again below); its random numbers
            # are given back, so capturing changes no caption
            cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):
                self.load(image_embeds)
                try:
                    self._capture()
                except RuntimeError as e:  # the same tokens without the graph, only slower
                    cause = e.__context__ or e  # what broke the capture, not capture_end's complaint
                    log.warning("CUDA graph capture failed (%s); decoding steps run without a graph", first_line(cause))
                    self.use_graph, self.graph = False, None
        self.load(image_embeds)
        if self.graph is not None and self.whole:  # every step, then one wait for the rows' length
            self.graph.replay()
            return self.seen[:, :int(self.stop)].clone()
        cur = self.first
        while cur + 1 < length and bool(self.running.any()):
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step()
            cur += 1
        return self.seen[:, :cur + 1].clone()
