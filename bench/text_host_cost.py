"""Host cost of the text half of scoring: what one thread spends per image besides the GPU's work.

    python bench/text_host_cost.py [--images 1024] [--num_captions 8]

The text half turns r token rows per image into captions (the BLIP tokenizer's batch decode),
masks them and the alt-text, tokenises them and runs all-MiniLM-L6-v2 through
sentence-transformers. On a GPU the model's arithmetic is nearly free; the rest is host work in
Python and Rust. This measures that rest on the CPU: the encoder's six transformer layers are
removed (embeddings, pooling and normalisation stay), so what is timed is the decoding, masking,
tokenisation and sentence-transformers' bookkeeping, with one torch thread. The last line is
``host H ms/image: at most R images/s per text thread``.
"""

from __future__ import annotations

import argparse
import os
import pickle
import random
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

WORDS = ("a cat dog on the table with red blue man woman sitting standing near tree car street "
         "picture photo of old house river bridge").split()


def host_only_encoder():
    """all-MiniLM-L6-v2 on the CPU without its six transformer layers (embeddings, pooling and
    normalisation stay), one torch thread: what is left of encoding is host work."""
    import torch

    from datacomp_sieve.text import TextEncoder

    torch.set_num_threads(1)
    enc = TextEncoder(None, device="cpu")
    enc.model[0].auto_model.encoder.layer = enc.model[0].auto_model.encoder.layer[:0]
    return enc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--num_captions", type=int, default=8)
    args = p.parse_args(argv)
    import numpy as np
    import torch

    from datacomp_sieve.caption import GenerationSettings, build_blip_tokenizer, decode_captions, per_image
    from datacomp_sieve.text import masked_texts, scores_of, sieve_scores

    enc = host_only_encoder()
    tok = build_blip_tokenizer()
    n, r = args.images, args.num_captions
    g = torch.Generator().manual_seed(0)
    # token rows as the sampler returns them: [DEC] a picture of, 11 words, [SEP], [PAD]s
    ids = torch.randint(1000, 8000, (n * r, 20), generator=g)
    ids[:, :4] = torch.tensor([tok.bos_token_id, 1037, 3861, 1997])
    ids[:, 15], ids[:, 16:] = tok.sep_token_id, tok.pad_token_id
    rng = random.Random(0)
    alts = [" ".join(rng.choices(WORDS, k=rng.randint(5, 15))) for _ in range(n)]
    t = time.perf_counter()
    texts = decode_captions(tok, ids, GenerationSettings().prompt)  # what BlipCaptioner.decode does
    caps = per_image(texts, r)
    decode_s = time.perf_counter() - t
    t = time.perf_counter()
    sieve_scores(enc, alts, caps)
    score_s = time.perf_counter() - t
    # split as with text processes (ShardScorer.text_workers): they turn the token rows into
    # captions, mask and tokenise; the scoring process sends the rows, takes the captions and
    # tokens back (unpickling), runs the encoder's forward and the cosines
    t = time.perf_counter()
    masked = masked_texts(alts, caps)
    features = enc.features(masked[0] + masked[1])
    worker_s = decode_s + time.perf_counter() - t
    back = pickle.dumps((features, masked, caps))
    t = time.perf_counter()
    pickle.dumps(ids.numpy().astype(np.int32))
    (batches, order), masked, _ = pickle.loads(back)
    scores_of(enc.embed(batches, order), masked)
    main_s = time.perf_counter() - t
    per = 1000 * (decode_s + score_s) / n
    print(f"{n} images x {r} captions (+ alt-text): token rows -> captions {decode_s:.2f} s, masking + "
          f"tokenising + sentence-transformers without its layers {score_s:.2f} s")
    print(f"split as with text processes: token rows -> captions, masking + tokenising {1000 * worker_s / n:.2f} "
          f"ms/image in a text process; the scoring process {1000 * main_s / n:.2f} ms/image (rows out, captions "
          "and tokens back, the encoder's forward without its layers, cosines)")
    print(f"host {per:.2f} ms/image: at most {1000 / per:.0f} images/s per text thread")
    return 0


if __name__ == "__main__":
    sys.exit(main())
