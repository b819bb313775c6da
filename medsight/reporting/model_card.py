"""The model card: what a reviewer needs to judge a trained model, filled from the run (Mitchell et al.,
"Model Cards for Model Reporting", FAT* 2019), with the reporting items of TRIPOD+AI (Collins et al., BMJ 2024)
and CLAIM 2024 (Tejani et al., Radiology: AI) that it answers named, and those it cannot answer listed.

One structure (a list of sections of paragraphs and tables) is rendered as ``model_card.md`` and as a
section of ``report.html``. The card states what was measured; it never fills a gap with an assumption.
"""

from __future__ import annotations

import html
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from medsight.metrics.bootstrap import format_ci
from medsight.reporting.html import html_table
from medsight.reporting.localization import localization_sections
from medsight.reporting.run_report import RunReport

__all__ = ["model_card_sections", "to_markdown", "to_html", "code_version", "ANSWERED", "NOT_ANSWERED"]

Table = tuple[list[str], list[list[Any]]]
Section = tuple[str, list[str | Table]]

#: Reporting items (by topic) the card answers from the run.
ANSWERED = [
    "TRIPOD+AI: source of data, and counts per split (development / evaluation data)",
    "TRIPOD+AI: outcome (the labels and classes predicted)",
    "TRIPOD+AI: model type and training settings (analytical methods), class imbalance handling",
    "TRIPOD+AI: performance measures with confidence intervals, discrimination and calibration",
    "TRIPOD+AI: fairness — performance per subgroup, when the data carries subgroup metadata",
    "TRIPOD+AI: model output and how it is used (thresholds, operating points, abstention)",
    "TRIPOD+AI / CLAIM: code availability and version",
    "CLAIM: data partitions (how images were assigned to training, validation and test)",
    "CLAIM: preprocessing (input size, normalization, data options)",
    "CLAIM: model selection (the monitored validation metric) and the final model",
    "CLAIM: performance metrics with statistical uncertainty (bootstrap intervals)",
    "CLAIM: robustness and failure analysis (corruptions, misclassified examples in the Grad-CAM gallery)",
    "CLAIM: explainability (Grad-CAM, faithfulness, border / shortcut score)",
]

#: Items the run cannot know: the user must answer them.
NOT_ANSWERED = [
    "TRIPOD+AI / CLAIM: clinical setting, intended patients and the care pathway the model would sit in",
    "TRIPOD+AI / CLAIM: eligibility criteria of patients and images, and the dates of data collection",
    "TRIPOD+AI / CLAIM: how the reference standard (the labels) was established, by whom, with what agreement",
    "TRIPOD+AI: sample size justification",
    "TRIPOD+AI / CLAIM: handling of missing data beyond unreadable files skipped",
    "CLAIM: de-identification of the images",
    "TRIPOD+AI: ethics approval, consent, funding, conflicts of interest, patient and public involvement",
    "TRIPOD+AI / CLAIM: comparison with clinicians, and clinical utility (decision curves, impact studies)",
    "TRIPOD+AI: external validation, unless `medsight evaluate --data OTHER_SITE` was run and its card attached",
]


def code_version() -> str:
    """``git describe`` of the source tree when it is a git checkout, else the installed package version."""
    here = Path(__file__).resolve().parent
    try:
        proc = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=here, capture_output=True,
                              text=True, timeout=5)
        if proc.returncode == 0 and proc.stdout.strip():
            return f"medsight git {proc.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return f"medsight {metadata.version('medsight')}"
    except metadata.PackageNotFoundError:
        return "medsight (version unknown)"


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _ci(ci: Any) -> str:
    return format_ci(ci, 3)


def _data_section(data: dict[str, Any], kind: str) -> Section:
    images = data.get("images", {})
    rows = [[split, images.get(split, sum(c)), ", ".join(f"{k} {n}" for k, n in zip(data["classes"], c)),
             _f(data.get("patients", {}).get(split))] for split, c in data["counts"].items()]
    per = "positive images per finding" if kind == "multilabel" else "per class"
    parts: list[str | Table] = [f"Source: `{data['source']}`.", (["split", "images", per, "patients"], rows)]
    parts += [f"Note: {n}" for n in data.get("notes", [])]
    if not any(data.get("patients", {}).values()):
        parts.append("Patients: not known (the data carries no patient identifiers); images of one patient may "
                     "sit in more than one split.")
    return "Data provenance and splits", parts


def _metrics_section(test: dict[str, Any], kind: str) -> Section:
    ci = test.get("ci95", {})
    names = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "auc": "AUC", "qwk": "QWK",
             "micro_auc": "micro AUC", "map": "mAP", "exact_match": "exact-match accuracy",
             "hamming_accuracy": "Hamming accuracy", "ece": "ECE"}
    if kind == "multilabel":
        names.update(auc="mean AUC over scoreable findings", ece="mean ECE over findings", accuracy="exact-match accuracy")
        names.pop("exact_match")
    rows = [[label, _f(test.get(k)), _ci(ci.get(k))] for k, label in names.items() if k in test]
    parts: list[str | Table] = [(["metric", "value", "95% CI"], rows)]
    if test.get("findings"):
        parts.append((["finding", "positives / labelled", "AUC", "95% CI", "AP", "threshold", "sensitivity",
                       "specificity"],
                      [[c, f"{f['positives']} / {f['n']}", _f(f["auc"]), _ci((f.get("ci95") or {}).get("auc")),
                        _f(f["ap"]), _f(f["threshold"]), _f(f["sensitivity"]), _f(f["specificity"])]
                       for c, f in test["findings"].items()]))
    if test.get("unscoreable"):
        parts.append("Not scoreable on test: " + "; ".join(f"{c} ({w})" for c, w in test["unscoreable"].items()) + ".")
    return f"Metrics on test ({kind.replace('_', '-')})", parts


def _trust_sections(trust: dict[str, Any]) -> list[Section]:
    out: list[Section] = []
    cal = trust["calibration"]
    t = cal.get("temperature")
    per_t = isinstance(t, list)
    rows = [[name] + ([_f(v.get("temperature"))] if per_t else []) + [_f(v["ece_before"]), _f(v["ece_after"])]
            for name, v in cal["per_view"].items()]
    out.append(("Calibration", [
        (f"Temperature scaling fitted on validation: T = {_f(t)}" if not per_t else
         "Temperature scaling fitted on validation, one temperature per finding (T in the table; 1.000 where "
         "validation holds one answer only)" + (", after subtracting log w from each finding's logit, the shift "
                                                "that training with positive weights w puts there." if
                                                cal.get("logit_offset") else ".")) if cal["fitted"] else
        "No temperature fitted (the task's head keeps raw probabilities, or eval.calibrate is off).",
        (f"ECE of every labelled (image, finding) probability pooled: before {_f(cal['ece_before'])}, after "
         f"{_f(cal['ece_after'])}." if per_t else
         f"Top-label ECE before {_f(cal['ece_before'])}, after {_f(cal['ece_after'])}."),
        (["class / finding"] + (["T"] if per_t else []) + ["ECE before", "ECE after"], rows)]))
    op = trust["operating_points"]
    rows = []
    for name, v in op["views"].items():
        c = v.get("ci95", {})
        rows.append([name, _f(v["threshold"]), f"{_f(v['val']['sensitivity'])} / {_f(v['val']['specificity'])}"]
                    + [f"{_f(v[k])} {_ci(c.get(k))}" for k in ("sensitivity", "specificity", "ppv", "npv")])
    out.append(("Operating points", [f"Target (chosen on validation): {op['target']}.",
                                     (["view", "threshold", "val sens / spec", "sensitivity", "specificity", "PPV",
                                       "NPV"], rows)]))
    sel = trust["selective"]
    parts: list[str | Table] = [(["score", "AURC (lower is better)"], [[n, _f(v, 4)] for n, v in sel["aurc"].items()]),
                                f"Best score: {sel['best']}."]
    if "abstention" in sel:
        a = sel["abstention"]
        parts.append(f"Refer to a clinician below confidence {_f(a['threshold'])} (the least confident "
                     f"{_f(a['val_fraction'], 2)} of validation): {_f(a['referred'])} of these images referred; error "
                     f"among the answered {_f(a['risk_answered'])} (all: {_f(sel['risk'])}).")
    out.append(("Knowing when not to answer", parts))
    if "conformal" in trust:
        out.append(_conformal_section(trust["conformal"]))
    if "tta" in trust:
        tt = trust["tta"]
        out.append(("Test-time augmentation", [
            f"{tt['views']} views; AUC {_f(tt['auc_without'])} without, {_f(tt['auc_with'])} with; ECE "
            f"{_f(tt['ece_without'])} without, {_f(tt['ece_with'])} with; used for decisions: "
            f"{'yes' if tt['used_for_decisions'] else 'no'}."]))
    out.append(_subgroup_section(trust.get("subgroups", {})))
    return out


def _conformal_section(c: dict[str, Any]) -> Section:
    how = f"Split conformal ({c['method']}{', class-conditional' if c['class_conditional'] else ''})"
    if "per_finding" not in c:
        return "Conformal prediction sets", [
            f"{how} for {c['target_coverage']:.0%} coverage: empirical coverage {_f(c['coverage'])}, mean set size "
            f"{_f(c['mean_set_size'], 2)}, single-class sets {_f(c['singleton_rate'])}.", c["caveat"]]
    rows = [[name, m["n"], _f(m["coverage"]), _f(m["mean_set_size"], 2), _f(m["uncertain_rate"])]
            for name, m in c["per_finding"].items()]
    return "Conformal prediction sets", [
        f"{how} per finding, for {c['target_coverage']:.0%} coverage of each finding: a finding's set is "
        f"{{absent}}, {{present}}, or both (uncertain). Mean coverage over findings {_f(c['coverage'])}, mean set "
        f"size {_f(c['mean_set_size'], 2)}, uncertain {_f(c['uncertain_rate'])}; images with every labelled "
        f"finding covered at once {_f(c['all_findings_covered'])} (not guaranteed).",
        (["finding", "labelled images", "coverage", "mean set size", "uncertain"], rows), c["caveat"]]


def _subgroup_section(sub: dict[str, Any]) -> Section:
    if not sub.get("columns"):
        return "Subgroups", [sub.get("note") or "No subgroup column found in the data's metadata."]
    parts: list[str | Table] = []
    if sub.get("note"):
        parts.append(sub["note"])
    for col, views in sub["columns"].items():
        for view, r in views.items():
            rows = [[g, v["n"], v["n_positive"], _f(v["auc"]), _f(v["sensitivity"]), v.get("note", "")]
                    for g, v in r["groups"].items()]
            parts.append(f"**{col}**, {view}" + (f" — {r['note']}" if r.get("note") else ""))
            parts.append((["group", "n", "positives", "AUC", "sensitivity", "note"], rows))
            for metric, gap in r["gaps"].items():
                if gap:
                    flag = " **flagged: the interval excludes 0**" if gap.get("flagged") else ""
                    parts.append(f"Largest {metric} gap: {gap['best']} − {gap['worst']} = {_f(gap['gap'])} "
                                 f"{_ci(gap.get('ci95'))}{flag}.")
    return "Subgroups", parts


def _robustness_section(rob: dict[str, Any] | None) -> Section:
    if not rob:
        return "Robustness", ["Not measured (`medsight robustness CHECKPOINT`, or eval.robustness=true)."]
    m = rob["metric"]
    rows = [[name] + [_f(r[m]) for r in rs] + [_f(sum(r["drop"] or 0 for r in rs) / len(rs))]
            for name, rs in rob["corruptions"].items()]
    return "Robustness", [f"Clean {m} {_f(rob['clean'])}; mean drop over corruptions and severities "
                          f"{_f(rob['mean_drop'])}.", (["corruption", "severity 1", "severity 2", "severity 3",
                                                        "mean drop"], rows)]


def model_card_sections(metrics: RunReport | dict[str, Any], config: dict[str, Any], data: dict[str, Any] | None
                        ) -> list[Section]:
    """The card's sections from a run's (or an external evaluation's) report, resolved config and data summary."""
    report = RunReport.of(metrics)
    model, optim, train = config.get("model", {}), config.get("optim", {}), config.get("train", {})
    d = config.get("data", {})
    sections: list[Section] = [
        ("Intended use", [
            "Research and development of medical image classifiers. **Not for clinical use**: the model must not "
            "guide diagnosis or treatment.",
            f"Task: {report.task}; classes: {', '.join(report.classes)}."]),
    ]
    if data:
        sections.append(_data_section(data, report.task))
    sections.append(("Model and training settings", [(["setting", "value"], [
        ["model", model.get("name")], ["input size", d.get("image_size")],
        ["optimizer", f"{optim.get('name')} lr {optim.get('lr')}" + (f" rho {optim.get('rho')}" if 'sam' in
                                                                     str(optim.get('name')) else "")],
        ["epochs (best)", f"{_f(report.epochs_run)} ({_f(report.best_epoch)})"],
        ["loss / class weights", f"{train.get('loss')} / {train.get('class_weights')}"],
        ["model selection", f"validation {report.monitor or train.get('monitor')}"],
        ["plan", "derived from the data (plan.json) for options not set" if config.get("plan") else "off"],
        ["seed", train.get("seed")]])]))
    sections.append(_metrics_section(report.test, report.task))
    if report.trust is not None:
        sections += _trust_sections(report.trust)
    sections.append(_robustness_section(report.robustness))
    ex = report.explain
    if ex:
        sections.append(("Shortcut check", [f"Grad-CAM border score (share of heat in the outer band; uniform "
                                            f"0.36): mean {_f(ex.get('border_score_mean'))}, highest class "
                                            f"{_f(ex.get('border_score_max_class'))}"
                                            + (" — **warning: possible shortcut**" if ex.get("border_warning") else "")
                                            + "."]))
    sections += localization_sections(report.plain())  # heatmaps against boxes, sanity checks: when measured
    sections.append(("Known limitations", [
        "Metrics come from one test split of the data named above; they need not transfer to other sites, "
        "scanners or populations (external validation: `medsight evaluate CHECKPOINT --data OTHER`).",
        "Calibration, operating points, conformal sets and the abstention threshold were fitted on the "
        "validation split and hold only for data like it.",
        "Subgroup results are shown only for the metadata the data carries; absent groups are unexamined."]))
    sections.append(("Code version", [code_version()]))
    sections.append(("Reporting items answered here (TRIPOD+AI, CLAIM 2024)", [f"- {a}" for a in ANSWERED]))
    sections.append(("Reporting items this card cannot answer", [f"- {a}" for a in NOT_ANSWERED]))
    return sections


def _md_table(t: Table) -> str:
    header, rows = t
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_f(c).replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def to_markdown(sections: list[Section], title: str) -> str:
    out = [f"# Model card: {title}", ""]
    for name, parts in sections:
        out += [f"## {name}", ""]
        for p in parts:
            out += [_md_table(p) if isinstance(p, tuple) else p, ""]
    return "\n".join(out)


def _inline(text: str) -> str:
    """Escape, then the two markdown marks the card uses: **bold** and `code`."""
    import re

    s = html.escape(text)
    s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)


def to_html(sections: list[Section]) -> str:
    out = []
    for name, parts in sections:
        out.append(f"<h3>{html.escape(name)}</h3>")
        for p in parts:
            if isinstance(p, tuple):
                out.append(html_table(p[0], [[_f(c) for c in r] for r in p[1]]))  # _f's strings, escaped there
            else:
                out.append(f"<p>{_inline(p)}</p>")
    return "\n".join(out)
