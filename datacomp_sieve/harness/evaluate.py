"""Zero-shot evaluation over a task list, and the summary in DataComp's groups.

``TASKS`` is DataComp's tasklist.yml as data: 40 tasks, 38 scored (FairFace and UTKFace have no
main metric), each with its main metric and its group in DataComp's aggregate_scores.py
(ImageNet, "ImageNet dist. shifts", VTAB, Retrieval; the rest count only in the Average).

The native evaluator reads evaluation sets in the webdataset layout that DataComp's
download_evalsets.py writes (``DATA/wds_{key with / as -}_test/``: ``test/{0..n-1}.tar``,
``test/nshards.txt``, ``classnames.txt``, ``zeroshot_classification_templates.txt``, and
``dataset_type.txt`` = retrieval for retrieval sets) through clip_benchmark, as DataComp's
eval_utils/wds_eval.py does: zero-shot classification (acc1, acc5, mean per-class recall) and
image-text retrieval (recall@1/5/10, main metric mean_recall@1). Tasks whose metric needs
DataComp's own code (WinoGAViL, WILDS, fairness) or whose set is missing are listed as not
evaluated; the summary then says over how many tasks each number is.

``eval_results.jsonl`` keeps DataComp's format; beside it, ``eval_results.sources.json`` records
what made each line this tool wrote (the checkpoint's path, size and modification time; the
evaluation set's folder and a hash of its file names, sizes and .txt files). A task already in the
results file is reused only when made from the same checkpoint and set; one made from another is
refused (a one-line error); one with no record (DataComp's own file) is reused with a warning.

``build_toy_tasks(DIR)`` writes two small local tasks in the same layout from the real photos
that ship in scikit-image, scikit-learn and matplotlib (the toy pool's pictures): ``toy/photos``
(classification: which photo is it, from crops and flips) and ``toy/photo_captions`` (retrieval:
each photo against its hand-written descriptions), for CI.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ..errors import UserError

log = logging.getLogger(__name__)

GROUPS = ("ImageNet", "ImageNet dist. shifts", "VTAB", "Retrieval")


@dataclass(frozen=True)
class Task:
    key: str             # tasklist.yml key, e.g. "vtab/cifar100"
    name: str            # the dataset name in eval_results.jsonl, e.g. "CIFAR-100"
    main_metric: str | None
    group: str | None = None   # one of GROUPS, or None (counts in the Average only)


def _t(key, name, metric="acc1", group=None):
    return Task(key, name, metric, group)


_SHIFT, _VTAB, _RET = "ImageNet dist. shifts", "VTAB", "Retrieval"
MPCR = "mean_per_class_recall"

# DataComp's tasklist.yml, in its order.
TASKS = (
    _t("vtab/caltech101", "Caltech-101", MPCR, _VTAB),
    _t("cifar10", "CIFAR-10"),
    _t("vtab/cifar100", "CIFAR-100", group=_VTAB),
    _t("vtab/clevr_count_all", "CLEVR Counts", group=_VTAB),
    _t("vtab/clevr_closest_object_distance", "CLEVR Distance", group=_VTAB),
    _t("country211", "Country211"),
    _t("vtab/dtd", "Describable Textures", group=_VTAB),
    _t("vtab/eurosat", "EuroSAT", group=_VTAB),
    _t("fgvc_aircraft", "FGVC Aircraft", MPCR),
    _t("food101", "Food-101"),
    _t("gtsrb", "GTSRB"),
    _t("imagenet1k", "ImageNet 1k", group="ImageNet"),
    _t("imagenet_sketch", "ImageNet Sketch", group=_SHIFT),
    _t("imagenetv2", "ImageNet v2", group=_SHIFT),
    _t("imagenet-a", "ImageNet-A", group=_SHIFT),
    _t("imagenet-o", "ImageNet-O", group=_SHIFT),
    _t("imagenet-r", "ImageNet-R", group=_SHIFT),
    _t("vtab/kitti_closest_vehicle_distance", "KITTI Vehicle Distance", group=_VTAB),
    _t("mnist", "MNIST"),
    _t("objectnet", "ObjectNet", group=_SHIFT),
    _t("vtab/flowers", "Oxford Flowers-102", MPCR, _VTAB),
    _t("vtab/pets", "Oxford-IIIT Pet", MPCR, _VTAB),
    _t("voc2007", "Pascal VOC 2007"),
    _t("vtab/pcam", "PatchCamelyon", group=_VTAB),
    _t("renderedsst2", "Rendered SST2"),
    _t("vtab/resisc45", "RESISC45", group=_VTAB),
    _t("cars", "Stanford Cars"),
    _t("stl10", "STL-10"),
    _t("sun397", "SUN397", group=_VTAB),
    _t("vtab/svhn", "SVHN", group=_VTAB),
    _t("retrieval/flickr_1k_test_image_text_retrieval", "Flickr", "mean_recall@1", _RET),
    _t("retrieval/mscoco_2014_5k_test_image_text_retrieval", "MSCOCO", "mean_recall@1", _RET),
    _t("misc/winogavil", "WinoGAViL", "jaccard_score_10-12", _RET),
    _t("wilds/iwildcam", "iWildCam", "F1-macro_all"),
    _t("wilds/camelyon17", "Camelyon17"),
    _t("wilds/fmow", "FMoW", "acc_worst_region"),
    _t("fairness/dollar_street", "Dollar Street", "acc_top5_wg"),
    _t("fairness/geode", "GeoDE", "acc_wg"),
    _t("fairness/fairface", "FairFace", None),
    _t("fairness/utkface", "UTKFace", None),
)
SCORED = tuple(t for t in TASKS if t.main_metric is not None)  # the 38

TOY_TASKS = (
    _t("toy/photos", "Toy photos"),
    _t("toy/photo_captions", "Toy photo captions", "mean_recall@1", _RET),
)
TASK_LISTS = {"datacomp": TASKS, "toy": TOY_TASKS}


def native_support(task: Task) -> str | None:
    """None when the native evaluator can run the task, else why not."""
    if task.key.startswith(("misc/", "wilds/", "fairness/")):
        return "its metric needs DataComp's evaluate.py (--datacomp)"
    return None


def task_dir(data_dir: str, task: Task) -> Path:
    """Where DataComp's download_evalsets.py puts a task's webdataset."""
    return Path(data_dir) / f"wds_{task.key.replace('/', '-')}_test"


# --------------------------------------------------------------------------------------------
# the toy tasks


# photo name -> class name (the toy pool's photos, toy_pool._PHOTOS)
_TOY_CLASSES = {
    "astronaut": "astronaut", "chelsea": "cat", "coffee": "cup of coffee", "rocket": "rocket",
    "stereo_motorcycle": "motorcycle", "camera": "cameraman", "coins": "coins", "moon": "moon",
    "page": "page of text", "hubble_deep_field": "galaxies", "retina": "retina",
    "immunohistochemistry": "stained tissue", "brick": "brick wall", "gravel": "gravel",
    "china": "pagoda", "flower": "dahlia", "grace_hopper": "woman in uniform", "gift": "gift box",
}
_TOY_TEMPLATES = ("a photo of a {c}.", "a picture of a {c}.", "{c}")


def _toy_views(im):
    """Six views of a photo: whole, flipped, centre crop and three corner crops."""
    from PIL import ImageOps

    w, h = im.size
    cw, ch = int(w * 0.7), int(h * 0.7)
    return [im, ImageOps.mirror(im), im.crop(((w - cw) // 2, (h - ch) // 2, (w + cw) // 2, (h + ch) // 2)),
            im.crop((0, 0, cw, ch)), im.crop((w - cw, h - ch, w, h)), im.crop((0, h - ch, cw, h))]


def _jpeg(im) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _write_wds(folder: Path, samples: list[dict], meta: dict[str, str]) -> None:
    (folder / "test").mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "test" / "0.tar", "w") as tar:
        for i, members in enumerate(samples):
            for ext, data in sorted(members.items()):
                info = tarfile.TarInfo(f"s{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (folder / "test" / "nshards.txt").write_text("1")
    for name, text in meta.items():
        (folder / name).write_text(text)


def build_toy_tasks(data_dir: str) -> list[str]:
    """Write the toy tasks under ``data_dir`` (DataComp's evaluation-set layout); returns their keys."""
    from PIL import Image

    from ..toy_pool import _PHOTOS, photo_array

    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise UserError(f"--data_dir {data_dir} is a file, not a folder: the toy tasks are written into a folder")
    photos = [p for p in _PHOTOS if p.name in _TOY_CLASSES]
    classes = [_TOY_CLASSES[p.name] for p in photos]
    cls_samples, ret_samples = [], []
    for label, p in enumerate(photos):
        im = Image.fromarray(photo_array(p.source)).convert("RGB")
        im.thumbnail((256, 256))
        for view in _toy_views(im):
            cls_samples.append({"jpg": _jpeg(view), "cls": str(label).encode()})
        captions = [p.aligned, p.hard, *p.extra_hard]
        ret_samples.append({"jpg": _jpeg(im), "txt": "\n".join(captions).encode("utf-8")})
    photos_task, captions_task = TOY_TASKS
    _write_wds(task_dir(data_dir, photos_task), cls_samples,
               {"classnames.txt": "\n".join(classes) + "\n",
                "zeroshot_classification_templates.txt": "\n".join(_TOY_TEMPLATES) + "\n"})
    _write_wds(task_dir(data_dir, captions_task), ret_samples, {"dataset_type.txt": "retrieval\n"})
    return [t.key for t in TOY_TASKS]


# --------------------------------------------------------------------------------------------
# evaluation


def load_model(info: dict, device: str):
    """The trained model and its validation transform, from a training run's info."""
    import open_clip
    import torch

    from .train import register_model

    register_model(info.get("model_config_file"))
    arch = info["scale_config"]["model"]
    torch.manual_seed(0)
    model, _, transform = open_clip.create_model_and_transforms(arch, pretrained=str(info["checkpoint"]))
    return model.eval().to(device), transform, open_clip.get_tokenizer(arch)


def _evaluate_task(task: Task, folder: Path, model, transform, tokenizer, device: str, batch_size: int) -> dict:
    import torch
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification as zsc
    from clip_benchmark.metrics import zeroshot_retrieval as zsr
    from sklearn.metrics import balanced_accuracy_score

    amp = device.startswith("cuda")
    kind = (folder / "dataset_type.txt").read_text().strip() if (folder / "dataset_type.txt").is_file() else ""
    ds = build_dataset(dataset_name=f"wds/{task.key}", root=str(folder), transform=transform, split="test",
                       download=False,
                       task="zeroshot_retrieval" if kind == "retrieval" else "zeroshot_classification")
    loader = torch.utils.data.DataLoader(ds.batched(batch_size), batch_size=None, shuffle=False, num_workers=0)
    if ds.classes is None:  # a retrieval set
        m = zsr.evaluate(model, loader, tokenizer, device, amp=amp, recall_k_list=[1, 5, 10])
        m["mean_recall@1"] = 0.5 * (m["text_retrieval_recall@1"] + m["image_retrieval_recall@1"])
        return m
    classifier = zsc.zero_shot_classifier(model, tokenizer, ds.classes, ds.templates, device, amp=amp)
    logits, target = zsc.run_classification(model, classifier, loader, device, amp=amp)
    pred = logits.argmax(axis=1).cpu()
    target = target.cpu()
    # top-k accuracy as clip_benchmark's zsc.accuracy (which numpy 2 breaks): hit within the k best
    top = logits.topk(min(5, len(ds.classes)), dim=1).indices.cpu()
    hits = top == target.view(-1, 1)
    return {"acc1": float(hits[:, :1].any(dim=1).float().mean()),
            "acc5": float(hits[:, :5].any(dim=1).float().mean()) if len(ds.classes) >= 5 else None,
            "mean_per_class_recall": float(balanced_accuracy_score(target, pred))}


def evaluate(train_output: str, data_dir: str, tasks: str = "datacomp", output_dir: str | None = None,
             batch_size: int = 64, device: str | None = None, progress: bool = True) -> dict:
    """Evaluate a training run on a task list; appends to ``eval_results.jsonl`` (DataComp's format:
    one line per task, ``{"key", "dataset", "metrics": {..., "main_metric"}}``) and returns
    ``{"results": {name: line}, "skipped": {name: reason}, "path": results file}``.

    Tasks already in the results file are not evaluated again (as DataComp's evaluate.py does) when
    made from this checkpoint and these sets, or of unknown sources; a warning says how many were
    taken from it. Those made from another checkpoint or set are a one-line error before any work.
    """
    import torch
    from tqdm import tqdm

    from .train import load_info, root_handlers_kept

    if tasks not in TASK_LISTS:
        raise UserError(f"unknown task list {tasks!r}: one of {', '.join(TASK_LISTS)}")
    if not os.path.isdir(data_dir):
        raise UserError(f"--data_dir {data_dir} is not a folder of evaluation sets "
                        "(DataComp's download_evalsets.py output, or `datacomp-sieve evaluate --toy_tasks`)")
    info = load_info(train_output)
    out = Path(output_dir or train_output)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "eval_results.jsonl"
    results = {r["dataset"]: r for r in read_results(path)} if path.exists() else {}
    records = read_sources(path, results)
    checkpoint = checkpoint_source(str(info["checkpoint"]))
    todo = [t for t in TASK_LISTS[tasks] if t.main_metric is not None]
    same, unknown = split_reused(path, records, [t for t in todo if t.name in results], checkpoint, data_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with root_handlers_kept():  # open_clip's root logging.info would leave a handler behind
        model, transform, tokenizer = load_model(info, device)
        skipped = {}
        for task in tqdm(todo, desc="evaluate", unit="task", disable=not progress):
            if task.name in results:
                continue
            why = native_support(task)
            folder = task_dir(data_dir, task)
            if why is None and not (folder / "test" / "nshards.txt").is_file():
                why = f"no evaluation set at {folder}"
            if why is not None:
                skipped[task.name] = why
                continue
            source = {"checkpoint": checkpoint, "eval_set": set_source(folder)}
            metrics = _evaluate_task(task, folder, model, transform, tokenizer, device, batch_size)
            metrics["main_metric"] = metrics.get(task.main_metric)
            line = {"key": task.key, "dataset": task.name, "metrics": metrics}
            results[task.name] = line
            with open(path, "a") as f:
                f.write(json.dumps(line) + "\n")
            records[task.name] = source
            _write_sources(path, records)
            log.info("%s: %s %.4f", task.name, task.main_metric, metrics["main_metric"])
    again = "(delete it, or give another --output_dir, to evaluate them anew)"
    if same:
        log.warning("%d task(s) taken from the existing %s, not evaluated again: made from this checkpoint and, "
                    "where --data_dir holds them, the same evaluation sets %s", len(same), path, again)
    if unknown:
        log.warning("%d task(s) taken from the existing %s, not evaluated again, made from an unknown checkpoint and "
                    "evaluation sets (%s has no record of them: DataComp's evaluate.py or an older datacomp-sieve "
                    "wrote them) %s", len(unknown), path, SOURCES, again)
    if skipped:
        log.warning("%d task(s) not evaluated: %s", len(skipped), _some(f"{k} ({v})" for k, v in skipped.items()))
    return {"results": results, "skipped": skipped, "path": str(path)}


# --------------------------------------------------------------------------------------------
# what made each result line


#: beside eval_results.jsonl (which keeps DataComp's format): {dataset: {"checkpoint", "eval_set"}}
SOURCES = "eval_results.sources.json"


def checkpoint_source(checkpoint: str) -> dict:
    """The checkpoint file: resolved path, size and modification time (training it again changes them)."""
    if not os.path.isfile(checkpoint):
        raise UserError(f"checkpoint {checkpoint} does not exist")
    st = os.stat(checkpoint)
    return {"path": os.path.realpath(checkpoint), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def set_source(folder: Path) -> dict:
    """An evaluation set: its folder and a short hash of its files' names and sizes and of its .txt files
    (nshards, class names, templates); no shard is read."""
    h = hashlib.sha1()
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            h.update(f"{rel.as_posix()} {p.stat().st_size}\n".encode())
            if p.suffix == ".txt":
                h.update(p.read_bytes())
    return {"folder": os.path.realpath(folder), "files": h.hexdigest()[:12]}


def read_sources(path: Path, results) -> dict:
    """The records beside a results file, of the datasets in ``results`` ({} when there are none)."""
    p = path.with_name(SOURCES)
    if not results or not p.is_file():
        return {}
    try:
        records = json.loads(p.read_text())
        records = {k: v for k, v in records.items() if k in results}
        for r in records.values():
            r["checkpoint"]["path"], r["eval_set"]["files"]  # noqa: B018 - both required
    except (ValueError, AttributeError, KeyError, TypeError):
        raise UserError(f"{p} is not a record of what made {path.name}: delete both, or give another "
                        "--output_dir") from None
    return records


def _write_sources(path: Path, records: dict) -> None:
    p = path.with_name(SOURCES)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(records, indent=1))
    os.replace(tmp, p)


def split_reused(path: Path, records: dict, tasks, checkpoint: dict, data_dir: str | None) -> tuple[list, list]:
    """Of ``tasks`` (all in the results file ``path``): those recorded as made from ``checkpoint`` and
    the sets in ``data_dir`` (where it holds them), and those with no record. Any made from another
    checkpoint or set is a one-line UserError naming them and what changed."""
    same, unknown, retrained, changed = [], [], {}, {}  # the last two: task name -> (then, now)
    for task in tasks:
        rec = records.get(task.name)
        if rec is None:
            unknown.append(task)
            continue
        folder = task_dir(data_dir, task) if data_dir else None
        now = set_source(folder) if folder and (folder / "test" / "nshards.txt").is_file() else None
        if rec["checkpoint"] != checkpoint:
            retrained[task.name] = (_file(rec["checkpoint"]), _file(checkpoint))
        if now is not None and rec["eval_set"]["files"] != now["files"]:
            changed[task.name] = (rec["eval_set"]["folder"], now["folder"])
        if task.name not in retrained and task.name not in changed:
            same.append(task)
    why = []
    if retrained:
        was, now = next(iter(retrained.values()))
        why.append(f"{_some(retrained, ', ')} from checkpoint {was}, now {now}")
    if changed:
        was, now = next(iter(changed.values()))
        why.append(f"{_some(changed, ', ')} from another evaluation set "
                   + (f"({was}, now {now})" if was != now else f"({was} has changed since)"))
    if why:
        raise UserError(f"{path} holds results made from other sources, not reused: {'; '.join(why)}; delete it, "
                        "or give another --output_dir, to evaluate anew")
    return same, unknown


def _file(checkpoint: dict) -> str:
    when = datetime.fromtimestamp(checkpoint["mtime_ns"] / 1e9).isoformat(sep=" ", timespec="seconds")
    return f"{checkpoint['path']} ({checkpoint['size']:,} bytes, modified {when})"


def _some(items, sep: str = "; ", n: int = 5) -> str:
    """The first ``n`` items joined, with "..." when there are more."""
    items = list(items)
    return sep.join(items[:n]) + (" ..." if len(items) > n else "")


# --------------------------------------------------------------------------------------------
# summary


def read_results(path: str | os.PathLike) -> list[dict]:
    """The lines of an ``eval_results.jsonl`` (DataComp's or ours)."""
    p = Path(path)
    if p.is_dir():
        p = p / "eval_results.jsonl"
    if not p.is_file():
        raise UserError(f"no results file at {p} (an eval_results.jsonl, or the folder that holds one)")
    lines = []
    for i, text in enumerate(p.read_text().splitlines(), 1):
        if text.strip():
            try:
                line = json.loads(text)
                line["dataset"], line["metrics"]  # noqa: B018 - both required
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{p} line {i} is not an evaluation result line") from None
            lines.append(line)
    return lines


def summarize(lines: list[dict]) -> dict:
    """DataComp's aggregates over the tasks present: group -> {"value", "n", "of"} (value None
    when no task of the group is present). Values are main metrics in [0, 1]."""
    import numpy as np

    scores = {l["dataset"]: l["metrics"].get("main_metric") for l in lines}
    scores = {k: float(v) for k, v in scores.items() if v is not None}
    known = {t.name: t for t in TASKS + TOY_TASKS}
    out = {}
    for group in GROUPS:
        members = [t.name for t in TASKS if t.group == group]
        present = [scores[n] for n in scores if n in known and known[n].group == group]
        out[group] = {"value": float(np.mean(present)) if present else None, "n": len(present), "of": len(members)}
    out["Average"] = {"value": float(np.mean(list(scores.values()))) if scores else None, "n": len(scores),
                      "of": len(SCORED)}
    return out


def format_summary(summary: dict) -> str:
    rows = []
    for group, s in summary.items():
        value = "-" if s["value"] is None else f"{100 * s['value']:.1f}"
        label = f"Average over {s['of']}" if group == "Average" and s["n"] == s["of"] else group
        note = "" if s["n"] == s["of"] else f"  ({s['n']} of {s['of']} tasks present)"
        if group == "Average" and s["n"] != s["of"]:
            label, note = f"Average over the {s['n']} tasks present", f"  (DataComp's Average is over {s['of']})"
        rows.append(f"{label:<38} {value:>6}{note}")
    return "\n".join(rows)
