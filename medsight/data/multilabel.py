"""Multi-label data: several findings per image (chest X-rays: effusion *and* cardiomegaly, "No Finding" = none).

Labels of a multi-label split are an (N, K) float32 array: 1 positive, 0 negative, and -1 where the label
is masked (left out of the loss and of that finding's metrics). Readers first return *raw* labels — 1, 0,
-1 for "uncertain" (CheXpert) and NaN for a blank cell — and :func:`apply_label_policy` turns them into
the final array by the run's policy (ignore = masked, ones = U-Ones, zeros = U-Zeros; Irvin et al.,
CheXpert, AAAI 2019), per finding where asked.

Sources are read as published (TorchXRayVision's idea of one reader per public layout) by
:mod:`medsight.data.readers` (``nih``, ``chexpert``, ``npz``).

Splits keep patients whole and rare findings in every split where possible (:func:`multilabel_split`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from medsight.errors import MedsightError

__all__ = ["NIH_FINDINGS", "NO_FINDING", "METADATA_COLUMNS", "apply_label_policy", "multilabel_split",
           "MultiLabelDataError"]

log = logging.getLogger(__name__)

#: ChestX-ray14's findings in ChestMNIST's label order (new findings in a manifest are appended after these).
NIH_FINDINGS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]
NO_FINDING = "No Finding"
#: Columns of a per-finding CSV that are never findings (compared case-insensitively).
METADATA_COLUMNS = ("path", "patient_id", "patient id", "patient", "split", "sex", "age", "frontal/lateral",
                    "ap/pa", "view", "view position", "image index", "study", "study_id", "image_id")
_UNCERTAIN, _MASKED = -1.0, -1.0
_POLICY_VALUE = {"ones": 1.0, "zeros": 0.0, "ignore": _MASKED}


class MultiLabelDataError(MedsightError, ValueError):
    """Multi-label data that cannot be used (raised as :class:`medsight.data.DataError` by the readers)."""


# ------------------------------------------------------------------------------------------- policies

def apply_label_policy(raw: np.ndarray, classes: Sequence[str], uncertain: str = "ignore", blank: str = "ignore",
                       per_finding: Mapping[str, str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Raw labels (1, 0, -1 uncertain, NaN blank) -> final labels (1, 0, -1 masked), and what was done.

    Args:
        uncertain: the run's policy for uncertain labels: ignore (masked), ones, zeros.
        blank: the policy for blank cells (the finding was not mentioned).
        per_finding: finding name -> policy for that finding's uncertain labels (over ``uncertain``).
    """
    raw = np.asarray(raw, dtype=np.float32)
    per_finding = dict(per_finding or {})
    unknown = sorted(set(per_finding) - set(classes))
    if unknown:
        raise MultiLabelDataError(f"data.uncertain_per_finding names {', '.join(unknown)}, which the data does not "
                                  f"have; its findings are {', '.join(classes)}")
    out = raw.copy()
    notes = []
    blanks = np.isnan(raw)
    if blanks.any():
        out[blanks] = _POLICY_VALUE[blank]
        notes.append(f"{int(blanks.sum())} blank label(s) (finding not mentioned): {blank}"
                     + (" (masked out of loss and metrics)" if blank == "ignore" else ""))
    for k, name in enumerate(classes):
        col = raw[:, k] == _UNCERTAIN
        if col.any():
            policy = per_finding.get(name, uncertain)
            out[col, k] = _POLICY_VALUE[policy]
            notes.append(f"{name}: {int(col.sum())} uncertain label(s) -> {policy}"
                         + (" (masked)" if policy == "ignore" else ""))
    return out, notes


# ------------------------------------------------------------------------------------------- splits

def multilabel_split(labels: np.ndarray, fraction: float, seed: int,
                     groups: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held) holding out about ``fraction`` of the images, patients whole, every finding's
    positives shared out as evenly as the patients allow.

    Iterative stratification (Sechidis, Tsoumakas & Vlahavas, ECML PKDD 2011) over *patients*: each
    patient is a unit carrying the positives of all its images; the rarest finding's patients are placed
    first, each into the side whose demand for that finding is largest. Written here because the
    libraries that implement it (iterative-stratification, scikit-multilearn) split images, not patients.
    """
    labels = np.asarray(labels)
    n = len(labels)
    rng = np.random.default_rng(seed)
    keys = list(groups) if groups is not None else [str(i) for i in range(n)]
    unit_ids: dict[str, int] = {}
    unit_of = np.array([unit_ids.setdefault(g, len(unit_ids)) for g in keys])
    n_units = len(unit_ids)
    pos = (labels == 1).astype(np.float64)
    unit_pos = np.zeros((n_units, labels.shape[1]))
    np.add.at(unit_pos, unit_of, pos)
    unit_size = np.bincount(unit_of, minlength=n_units).astype(np.float64)
    share = np.array([1 - fraction, fraction])
    demand_images = share * n
    demand = share[:, None] * unit_pos.sum(0)[None, :]  # (2 sides, K) positives each side still wants
    side_of = np.full(n_units, -1)
    order = rng.permutation(n_units)  # ties broken at random, with the seed
    while (side_of == -1).any():
        left = order[side_of[order] == -1]
        carrying = left[unit_pos[left].sum(1) > 0]
        if len(carrying):
            counts = unit_pos[left].sum(0)
            k = int(np.argmin(np.where(counts > 0, counts, np.inf)))  # the rarest finding still unplaced
            batch = left[unit_pos[left, k] > 0]
        else:
            k, batch = None, left
        for u in batch:
            if k is not None:
                want = demand[:, k]
                best = np.flatnonzero(want == want.max())
            else:
                best = np.array([0, 1])
            if len(best) > 1:  # then by images still wanted
                best = best[demand_images[best] == demand_images[best].max()]
            side = int(rng.choice(best))
            side_of[u] = side
            demand[side] -= unit_pos[u]
            demand_images[side] -= unit_size[u]
    held_units = side_of == 1
    if not held_units.any() or held_units.all():  # too few patients to split: hold out one at random
        held_units[:] = False
        held_units[rng.integers(n_units)] = True
    held = held_units[unit_of]
    return np.flatnonzero(~held), np.flatnonzero(held)
