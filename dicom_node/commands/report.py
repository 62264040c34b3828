"""``cag-node report FILE... [--bundle DIR] [--config FILE] [--json]`` — selector + VLM on the
runs of one study.

Prints laterality and key frames per run and the draft report per language (findings,
impression, recommendation).  With ``--json``: ``{"runs": [{file, sop_instance_uid, laterality,
confidence, key_frames, error}], "lesions": [{sop_instance_uid, frame_number, segment, vessel,
side, stenosis_pct, grade, x, y, confidence, ...}], "report": {"en": {findings, impression, recommendation,
format_ok}, "ja": {...}}, "model": {...}, "timing_s": {...}}``.  The VLM is the one ``vlm`` in the
config names (default: the bundle's own).  Exit status 1 when no run could be analysed or the
VLM failed.
"""

from __future__ import annotations

import json
import sys
import time


from dicom_node.commands import add_run_arguments


def register(sub) -> None:
    p = sub.add_parser("report", help="selector + VLM on the runs of one study: a draft bilingual report")
    add_run_arguments(p, "DICOM runs (multi-frame XA) of one study", "print JSON")
    p.add_argument("--languages", default=None,
                   help="comma-separated report languages (default: processing.languages, en,ja)")
    p.set_defaults(func=run)


def _vlm_cfg(cfg):
    v = cfg.vlm.model_dump()
    for key in ("path", "adapter"):
        if v.get(key):
            v[key] = str(cfg.resolve(v[key]))
    return v


def run(args) -> int:
    from pathlib import Path

    from dicom_node.config import load_config
    from inference.types import LANGUAGES, RunSelection

    cfg = load_config(args.config)
    if args.languages:
        langs = [l.strip() for l in args.languages.split(",") if l.strip()]
        bad = [l for l in langs if l not in LANGUAGES]
        if bad:
            from dicom_node.cli import UsageError

            raise UsageError(f"--languages: unknown language(s) {bad}; choose from {list(LANGUAGES)}")
    else:
        langs = list(cfg.processing.languages)
    from dicom_node.commands import load_selector_bundle

    bundle = load_selector_bundle(args, cfg, "report")
    if bundle is None:
        return 1
    from inference.selector import Selector, SelectorError

    sc = cfg.selector
    t0 = time.monotonic()
    try:
        sel = Selector(bundle, threads=sc.threads, batch_size=sc.batch_size, providers=sc.providers)
    except SelectorError as exc:
        print(f"cag-node report: {exc}", file=sys.stderr)
        return 1
    runs: list[RunSelection] = []
    for f in args.files:
        if not Path(f).is_file():
            runs.append(RunSelection(file=f, sop_instance_uid="", error=f"{f}: no such file"))
            continue
        runs.append(sel.select_run(f, min_gap=sc.min_gap, max_key_frames=sc.max_key_frames))
    t_sel = time.monotonic() - t0
    ok = [r for r in runs if r.ok]
    out_runs = [{k: r.to_dict()[k] for k in ("file", "sop_instance_uid", "laterality", "confidence",
                                             "key_frames", "error")} for r in runs]
    if not ok:
        if args.json:
            print(json.dumps({"runs": out_runs, "report": {}, "error": "no run could be analysed"},
                             indent=2, ensure_ascii=False))
        print("cag-node report: no run could be analysed", file=sys.stderr)
        return 1

    from inference.keyimages import key_images
    from inference.reporting import findings_from_lesions, templated_report
    from inference.vlm import ReportError, load_backend, report_study

    # the lesion model on every key frame, when the bundle has one
    t_les0 = time.monotonic()
    lesions = []
    has_lesions = bundle.manifest.lesions is not None and cfg.lesions.enabled
    if has_lesions:
        from inference.lesions import LesionModel, LesionModelError, lesions_on_key_frames

        try:
            lm = LesionModel(bundle, threads=cfg.lesions.threads, providers=cfg.lesions.providers)
        except LesionModelError as exc:
            print(f"cag-node report: {exc}", file=sys.stderr)
            return 1
        lesions = lesions_on_key_frames(lm, ok, min_confidence=cfg.lesions.min_confidence)
    t_les = time.monotonic() - t_les0
    concepts = findings_from_lesions(lesions) if has_lesions else None

    t1 = time.monotonic()
    t_load = 0.0
    try:
        if cfg.vlm.backend == "none":
            if not has_lesions:
                print("cag-node report: vlm.backend is 'none' and the bundle has no lesion model: no report",
                      file=sys.stderr)
                return 1
            backend = None
            report = templated_report(concepts, sides=sorted({r.laterality for r in ok}), languages=langs)
        else:
            backend = load_backend(_vlm_cfg(cfg), bundle)
            t_load = time.monotonic() - t1
        t2 = time.monotonic()
        if backend is not None:  # report_study gives the concepts only to a model trained with them
            report = report_study(backend, key_images(ok, backend.max_images), languages=langs,
                                  concepts=concepts)  # the node's image policy
    except (ReportError, ImportError, OSError, ValueError) as exc:
        print(f"cag-node report: VLM failed: {exc}", file=sys.stderr)
        return 1
    t_vlm = time.monotonic() - t2
    info = backend.model_info if backend is not None else bundle.model_info()
    from inference.vlm.findings import language_discrepancies

    discrepancies = language_discrepancies(report)
    if args.json:
        print(json.dumps({
            "runs": out_runs,
            "report": {k: v.to_dict() for k, v in report.items()},
            "lesions": [l.to_dict() for l in lesions],
            "model": info.to_dict(),
            "discrepancies": discrepancies,
            "timing_s": {"selector": round(t_sel, 3), "lesions": round(t_les, 3), "vlm_load": round(t_load, 3),
                         "vlm": round(t_vlm, 3)},
        }, indent=2, ensure_ascii=False))
    else:
        for r in runs:
            if r.error:
                print(f"{r.file}: ERROR {r.error}")
            else:
                print(f"{r.file}: {r.laterality} {r.confidence:.3f}; key frames "
                      f"{', '.join(str(k.frame_number) for k in r.key_frames)}")
        for l in lesions:
            print(f"lesion: {l.vessel} #{l.segment} {l.stenosis_pct:.0f}% (grade {l.grade}) on frame "
                  f"{l.frame_number} of {l.sop_instance_uid} at ({l.x:.0f}, {l.y:.0f}), confidence {l.confidence:.2f}")
        print(f"\nModel: {info.name} {info.version} (VLM {info.vlm}{', adapter ' + info.adapter if info.adapter else ''})"
              + (" — DEMO, synthetic data, not for clinical use" if info.synthetic_demo else ""))
        for lang, rep in report.items():
            print(f"\n[{lang}]" + ("" if rep.format_ok else " (model did not follow the report format)"))
            print(f"  Findings: {rep.findings}")
            print(f"  Impression: {rep.impression}")
            print(f"  Recommendation: {rep.recommendation}")
        if discrepancies:
            print("\nThe drafts disagree: " + "; ".join(discrepancies))
    return 0
