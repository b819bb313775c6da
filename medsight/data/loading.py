"""Loading data for a run or a trained model: a source (``medsight.data.sources``) or a prepared cache of one
(``medsight.data.cache``), completed into train / val / test and checked against the config or the model."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medsight.data.cache import cache_source, is_cache, open_cache
from medsight.data.grades import order_grades
from medsight.data.readers import Source, read_source, reader_options
from medsight.data.sources import (ROTATION_CLASSES, DataBundle, DataError, SplitData, complete_splits,
                                   rotation_pretext, stratified_split)

if TYPE_CHECKING:
    from medsight.config import DataConfig

__all__ = ["load_data", "load_eval_data", "read_any"]

log = logging.getLogger(__name__)


def read_any(path_str: str, **options: Any) -> Source:
    """A prepared cache folder (checked against its source when the source is at hand), or any source
    :func:`medsight.data.readers.read_source` reads."""
    if path_str and Path(path_str).expanduser().is_dir() and is_cache(Path(path_str).expanduser()):
        splits, classes, _, notes, manifest = open_cache(path_str, check_source=True)
        return Source(splits, classes, str(Path(path_str).expanduser()), notes,
                      list(manifest.get("source_skipped", [])))
    return read_source(path_str, **options)


def keep_shots(data: SplitData, k: int, seed: int, classes: Sequence[str]) -> SplitData:
    """k images of every class, drawn at random (seeded): the labelled images of a few-shot run."""
    labels = np.asarray(data.labels)
    if labels.ndim != 1:
        raise DataError("--shots (data.shots) keeps k images per class; multi-label findings have no single class")
    counts = np.bincount(labels, minlength=len(classes))
    if k > counts.min():
        small = int(counts.argmin())
        raise DataError(f"--shots {k} (data.shots) is larger than the smallest class: {classes[small]!r} has "
                        f"{counts[small]} training image(s); choose --shots {max(1, int(counts.min()))} or fewer")
    rng = np.random.default_rng(seed)
    keep = np.concatenate([rng.choice(np.flatnonzero(labels == c), size=k, replace=False) for c in range(len(classes))])
    return data.subset(np.sort(keep))


def load_data(cfg: DataConfig) -> DataBundle:
    """Read the data named by ``cfg.path`` (the embedded default when empty) into train/val/test.

    CSV manifests read ``cfg.allow_outside_paths`` (paths outside the manifest's folder), ``cfg.path_column``
    and ``cfg.label_column`` (column names) where the config has them. With ``cfg.cache``, the images come
    from that prepared cache of the source (prepared first when new; see ``medsight.data.cache``).
    """
    src = cache_source(cfg) if getattr(cfg, "cache", None) else read_any(cfg.path, **reader_options(cfg))
    splits, classes, source, notes = src.splits, src.classes, src.path, src.notes
    splits = complete_splits(splits, cfg, notes)
    if cfg.train_fraction < 1:
        n_before = len(splits["train"])
        _, splits["train"] = stratified_split(splits["train"], cfg.train_fraction, cfg.split_seed)
        notes.append(f"kept {len(splits['train'])} of {n_before} training images (data.train_fraction "
                     f"{cfg.train_fraction:g}, stratified, seed {cfg.split_seed})")
    if getattr(cfg, "shots", None):
        n_before = len(splits["train"])
        splits["train"] = keep_shots(splits["train"], cfg.shots, cfg.split_seed, classes)
        notes.append(f"few-shot: kept {cfg.shots} training images per class of {n_before} (data.shots, seed "
                     f"{cfg.split_seed})")
    if cfg.pretext == "rotation":
        notes.append("rotation pretext: labels ignored; the model predicts each image's quarter turns "
                     "(training split in all four turns)")
        return DataBundle(classes=list(ROTATION_CLASSES), splits=rotation_pretext(splits, cfg.split_seed),
                          source=source, notes=notes, skipped=src.skipped)
    if getattr(cfg, "grade_order", None):  # ordinal data whose class names do not sort in grade order
        splits, classes = order_grades(splits, classes, cfg.grade_order)
    if cfg.num_classes is not None and cfg.num_classes != len(classes):
        raise DataError(f"data.num_classes is {cfg.num_classes} but {cfg.path or 'the data'} has {len(classes)} "
                        f"classes ({', '.join(classes[:10])}{' ...' if len(classes) > 10 else ''})")
    if cfg.class_names:
        if len(cfg.class_names) != len(classes):
            raise DataError(f"data.class_names has {len(cfg.class_names)} names but the data has "
                            f"{len(classes)} classes ({', '.join(classes)})")
        classes = list(cfg.class_names)
    if len(classes) < 2:
        raise DataError(f"{source}: need at least 2 classes, found {len(classes)}")
    bundle = DataBundle(classes=classes, splits=splits, source=source, notes=notes, skipped=src.skipped)
    for name, c in bundle.counts().items():
        empty = [classes[i] for i, n in enumerate(c) if n == 0]
        if bundle.multilabel and empty:  # kept: trained on its negatives, reported as unscoreable
            y = bundle.splits[name].labels
            unlabelled = [classes[i] for i in range(len(classes)) if classes[i] in empty and (y[:, i] == -1).all()]
            negatives = [e for e in empty if e not in unlabelled]
            if unlabelled:
                msg = (f"finding(s) {', '.join(unlabelled)} have no {name} labels at all (every cell blank, "
                       f"uncertain or masked)" + (": not learned" if name == "train" else ": not scoreable"))
                log.warning("%s: %s", source, msg)
                notes.append(msg)
            if negatives:
                msg = f"finding(s) {', '.join(negatives)} have no positive {name} images"
                msg += ": trained on negatives only" if name == "train" else ": not scoreable on this split"
                log.warning("%s: %s", source, msg)
                notes.append(msg)
        elif name == "train" and empty:
            raise DataError(f"{source}: class(es) {', '.join(empty)} have no training images")
    return bundle


def load_eval_data(path: str, classes: list[str], prefer: Sequence[str] = ("test", "all"), *, multilabel: bool = False,
                   allow_outside_paths: bool = False, path_column: str | None = None,
                   label_column: str | None = None, label_policy: dict[str, Any] | None = None
                   ) -> tuple[SplitData, str]:
    """Images of ``path`` for a trained model: the first split of ``prefer`` that the data has (by default
    the test split, else every image), with labels matched to the model's ``classes`` by name.

    Names that match in another order are re-mapped; data without names of its own (``0``, ``1``, ...)
    is matched by position, with a warning; names that differ are refused. ``multilabel``: the model
    expects one column per finding (columns are matched by name the same way). ``label_policy``: the
    multi-label ``uncertain``/``blank``/``uncertain_per_finding`` policies; the other keyword options are
    the CSV reader's (see ``load_data``).
    """
    src = read_any(path, allow_outside_paths=allow_outside_paths, path_column=path_column,
                   label_column=label_column, **(label_policy or {}))
    splits, data_classes, source, notes = src.splits, src.classes, src.path, src.notes
    for note in notes:
        log.info("%s: %s", source, note)
    data = next((splits[s] for s in prefer if splits.get(s)), None)
    if data is None:
        wanted = " or ".join("unsplit" if s == "all" else s for s in prefer)
        raise DataError(f"{source} has no {wanted} images to use")
    if (data.labels.ndim == 2) != multilabel:
        raise DataError(f"{source} has {'several findings' if data.labels.ndim == 2 else 'one class'} per image but "
                        f"the model was trained on {'several findings' if multilabel else 'one class'} per image")
    if len(data_classes) != len(classes):
        raise DataError(f"{source} has {len(data_classes)} classes ({', '.join(data_classes)}) but the model "
                        f"was trained on {len(classes)} ({', '.join(classes)})")
    if list(data_classes) == list(classes):
        return data, source
    model_index = {c.strip().lower(): i for i, c in enumerate(classes)}
    if sorted(model_index) == sorted(c.strip().lower() for c in data_classes):
        remap = np.array([model_index[c.strip().lower()] for c in data_classes], dtype=np.int64)
        if multilabel:  # one column per finding: reorder the columns
            cols = np.empty_like(data.labels)
            cols[:, remap] = data.labels
            return dataclasses.replace(data, labels=cols), source
        log.info("%s: classes matched to the model's by name (%s)", source,
                 ", ".join(f"{c}->{classes[remap[i]]}" for i, c in enumerate(data_classes)))
        return dataclasses.replace(data, labels=remap[data.labels]), source
    if all(c == str(i) for i, c in enumerate(data_classes)):
        log.warning("%s carries no class names; matching its labels 0..%d to the model's classes by position (%s)",
                    source, len(classes) - 1, ", ".join(classes))
        return data, source
    raise DataError(f"{source} has classes {', '.join(data_classes)} but the model knows {', '.join(classes)}; "
                    f"rename the folders or labels to the model's class names")
