"""The paper's experiments as data, its published numbers, and ``compare``.

``EXPERIMENTS[name]`` is a scale and rows; a row is the filter settings that make its subset
(filter name, fraction kept, alpha, CLIP arch, and the Sieve scoring settings: captioner, number
of captions, text encoder) and, where the paper publishes them, its numbers (percent) by DataComp
group. Published numbers: Table 1 in full (SPEC.md section 2); the 38-task averages of Tables 4
and 5. Rows that this tool cannot make (DataComp's own Basic and LAION baselines; the CLIP and
BLIP text encoders of Table 4) carry the reason in ``not_runnable`` and are kept for ``compare``.
Where the paper's text leaves a setting open (the fraction of Tables 2-4, the filter of Figure 4)
the row says which value is used in ``note``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import UserError

GROUP_KEYS = ("ImageNet", "ImageNet dist. shifts", "VTAB", "Retrieval", "Average")
DEFAULT_TEXT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass(frozen=True)
class Row:
    label: str
    filter: str                      # a datacomp-sieve filter name
    fraction: float | None = None
    alpha: float | None = None
    arch: str = "l14"
    captioner: str = "blip-base-14m"
    num_captions: int = 8
    text_encoder: str = DEFAULT_TEXT_ENCODER
    published: dict = field(default_factory=dict)  # group -> percent
    not_runnable: str | None = None
    note: str | None = None

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.label.lower()).strip("-")

    @property
    def uses_sieve(self) -> bool:
        return self.filter in ("sieve", "sieve_clip")

    def filter_args(self, pool: str, save_path: str, scores_dir: str | None) -> list[str]:
        """``baselines.py`` arguments that make this row's subset from a pool (metadata/, shards/)."""
        args = ["--name", self.filter, "--metadata_dir", f"{pool}/metadata", "--save_path", save_path, "--quiet"]
        if self.fraction is not None:
            args += ["--fraction", str(self.fraction)]
        if self.filter in ("clip_score", "sieve_clip"):
            args += ["--arch", self.arch]
        if self.alpha is not None:
            args += ["--alpha", str(self.alpha)]
        if self.uses_sieve:
            args += ["--scores_dir", scores_dir, "--shards_dir", f"{pool}/shards", "--captioner", self.captioner,
                     "--num_captions", str(self.num_captions), "--text_encoder", self.text_encoder]
        return args

    def scores_key(self) -> str:
        """Rows with the same scoring settings share a score store."""
        name = self.captioner.rstrip("/").rsplit("/", 1)[-1]
        enc = self.text_encoder.rstrip("/").rsplit("/", 1)[-1]
        return re.sub(r"[^A-Za-z0-9.-]+", "_", f"{name}-r{self.num_captions}-{enc}")


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    scale: str
    rows: tuple


def _t1(no, basic, laion, clip, sieve, fused):
    g = lambda v: dict(zip(GROUP_KEYS, v))  # noqa: E731
    dc = "a DataComp baseline: make its subset with DataComp's baselines.py, then use reshard/train/evaluate"
    return (
        Row("No filtering", "no_filter", published=g(no)),
        Row("Basic", "basic_filter", published=g(basic), not_runnable=dc),
        Row("LAION", "laion2b", published=g(laion), not_runnable=dc),
        Row("CLIPScore L/14 30%", "clip_score", 0.3, published=g(clip)),
        Row("Sieve 20%", "sieve", 0.2, published=g(sieve)),
        Row("Sieve+CLIPScore alpha 0.5 20%", "sieve_clip", 0.2, alpha=0.5, published=g(fused)),
    )


def _avg(v):
    return {"Average": v}


_T4_MISSING = "this tool's text encoders are sentence-transformers models; the paper's {} text encoder is not one"
_FRACTION_NOTE = "the fraction is not in SPEC.md; 20%, the paper's default, is used"

EXPERIMENTS = {e.name: e for e in (
    Experiment("table1-medium", "Table 1, medium scale", "medium", _t1(
        (17.6, 15.2, 25.9, 21.9, 25.8), (22.6, 19.3, 28.4, 25.1, 28.5), (23.0, 19.8, 30.7, 23.3, 29.2),
        (27.3, 23.0, 33.8, 25.1, 32.8), (29.4, 25.0, 35.2, 28.9, 34.6), (30.3, 25.4, 36.2, 27.8, 35.4))),
    Experiment("table1-large", "Table 1, large scale", "large", _t1(
        (45.9, 37.8, 42.6, 41.9, 43.7), (51.6, 42.3, 44.6, 48.0, 45.8), (55.3, 45.3, 51.0, 49.5, 50.1),
        (57.8, 47.4, 53.8, 46.6, 52.9), (57.3, 47.8, 52.0, 52.0, 52.3), (59.7, 49.1, 54.8, 51.1, 54.6))),
    Experiment("table2", "Table 2: captioner pretrained on 14M vs 129M pairs (Sieve, medium)", "medium", tuple(
        Row(f"BLIP {data} {int(f * 100)}%", "sieve", f, captioner=f"blip-base-{data.lower()}")
        for data in ("14M", "129M") for f in (0.1, 0.15, 0.2))),
    Experiment("table3", "Table 3: GIT vs BLIP captioner (Sieve, medium)", "medium", (
        Row("GIT", "sieve", 0.2, captioner="git-base", note=_FRACTION_NOTE),
        Row("BLIP", "sieve", 0.2, note=_FRACTION_NOTE),
    )),
    Experiment("table4", "Table 4: text encoder (Sieve, medium)", "medium", (
        Row("CLIP text encoder", "sieve", 0.2, text_encoder="clip", published=_avg(25.90),
            not_runnable=_T4_MISSING.format("CLIP")),
        Row("BLIP text encoder", "sieve", 0.2, text_encoder="blip", published=_avg(31.85),
            not_runnable=_T4_MISSING.format("BLIP")),
        Row("Sentence transformer", "sieve", 0.2, published=_avg(34.03)),
    )),
    Experiment("table5", "Table 5: captions per image, and the CLIPScore weight alpha (medium)", "medium", (
        *(Row(f"{r} caption{'s' if r > 1 else ''}", "sieve", 0.2, num_captions=r, published=_avg(v))
          for r, v in ((1, 32.50), (2, 33.40), (4, 33.70), (8, 34.03))),
        *(Row(f"alpha {a}", "sieve_clip", 0.2, alpha=a, published=_avg(v) if v is not None else {})
          for a, v in ((0.0, None), (0.3, 34.40), (0.5, 35.15), (0.7, 34.35))),
    )),
    Experiment("figure4", "Figure 4: fraction kept (Sieve+CLIPScore alpha 0.5, medium)", "medium", tuple(
        Row(f"{p}% kept", "sieve_clip", p / 100, alpha=0.5,
            note="the figure's numbers are not stored; the filter is the paper's best (Sieve+CLIPScore)")
        for p in (10, 15, 20, 25, 30))),
)}


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise UserError(f"unknown experiment {name!r}: one of {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]


def find_row(experiment: Experiment, label: str) -> Row:
    for row in experiment.rows:
        if label in (row.label, row.slug):
            return row
    raise UserError(f"{experiment.name} has no row {label!r}: " + ", ".join(r.slug for r in experiment.rows))


def compare_rows(measured: dict, published: dict) -> list[tuple]:
    """(group, measured %, published %, difference) for each group; None where a side lacks it.
    ``measured`` is ``evaluate.summarize`` output (values in [0, 1])."""
    out = []
    for group in GROUP_KEYS:
        s = measured.get(group) or {}
        m = None if s.get("value") is None else 100 * s["value"]
        p = published.get(group)
        out.append((group, m, p, None if m is None or p is None else m - p, s.get("n"), s.get("of")))
    return out


def not_comparable(lines: list[dict], scale: str | None) -> str | None:
    """What makes results incomparable with the paper's numbers (toy tasks, a toy-scale model), or None."""
    from .evaluate import TOY_TASKS

    why = []
    if any(l["dataset"] in {t.name for t in TOY_TASKS} for l in lines):
        why.append("the toy tasks")
    if scale == "toy":
        why.append("a toy-scale model")
    return " and ".join(why) or None


def format_compare(title: str, rows: list[tuple], incomparable: str | None = None) -> str:
    """The table; with ``incomparable`` (see ``not_comparable``) the published and diff columns say n/a."""
    f = lambda v, sign="": "-" if v is None else format(v, f"{sign}.1f")  # noqa: E731
    lines = [title, f"  {'group':<24} {'measured':>9} {'published':>10} {'diff':>7}"]
    if incomparable:
        lines.append(f"  measured with {incomparable}: not comparable with the paper's numbers (n/a)")
    for group, m, p, d, n, of in rows:
        partial = f"  ({n} of {of} tasks)" if n is not None and of and n != of and m is not None else ""
        if incomparable:
            p, d = "n/a", "n/a"
        else:
            p, d = f(p), f(d, "+")
        lines.append(f"  {group:<24} {f(m):>9} {p:>10} {d:>7}{partial}")
    return "\n".join(lines)
