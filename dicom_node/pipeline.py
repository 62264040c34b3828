"""Processing of one complete study: frames → selector → lesions → VLM → SR + KOS → outbox.

Called by the node's worker pool (off the association threads) for each queued
job.  Each stage is a journal state change (``stage`` on the study row) with
its own timeout, its latency observed in ``/metrics``, and its error recorded
against the study.  A stage that hangs is abandoned after its timeout and the
study is failed with a clear reason: a stuck model must never stall the node.

Instances that are not angiography (per ``processing.modalities``), single
frames, and runs the selector finds no usable frame in are recorded with the
reason, and the study still gets an SR that says what was and was not analysed.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pydicom

from dicom_node.context import NodeContext
from dicom_node.metrics import NodeMetrics
from dicom_node.tables import OutboxState
from inference.types import ReportText, RunSelection, StudyResult

log = logging.getLogger(__name__)


class StageTimeout(RuntimeError):
    """A pipeline stage ran past its configured timeout."""


class StaleStudy(Exception):
    """The study was reopened by a late instance while it was being processed."""


class StageError(RuntimeError):
    """A pipeline stage failed; ``stage`` names it."""

    def __init__(self, stage: str, message: str):
        super().__init__(f"{stage}: {message}")
        self.stage = stage


def run_with_timeout(stage: str, timeout_s: float, fn: Callable[..., Any], *args, **kwargs) -> Any:
    """Run ``fn`` in a daemon thread and wait at most ``timeout_s``.

    A daemon thread (not a ThreadPoolExecutor, whose workers are joined at
    interpreter exit) so that a model call that never returns can neither stall
    the study queue nor hold up a graceful shutdown.
    """
    fut: cf.Future = cf.Future()

    def _target():
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to the waiting caller
            fut.set_exception(exc)

    threading.Thread(target=_target, name=f"stage-{stage}", daemon=True).start()
    try:
        return fut.result(timeout=timeout_s)
    except cf.TimeoutError:
        raise StageTimeout(f"{stage} did not finish within {timeout_s:g} s") from None


@dataclass
class _Timer:
    timings: dict[str, float] = field(default_factory=dict)

    metrics: Optional[NodeMetrics] = None

    def record(self, stage: str, seconds: float) -> None:
        self.timings[stage] = round(seconds, 3)
        if self.metrics is not None:
            self.metrics.observe_stage(stage, seconds)


# ---------------------------------------------------------------------------
def _classify_instances(instances, modalities: list[str]):
    """Split a study's instances into runs to analyse and the rest (with reasons)."""
    runs, skipped = [], []
    for inst in instances:
        modality = (getattr(inst, "modality", "") or "").upper()
        reason = None
        if modality not in modalities:
            reason = f"modality {modality or '(none)'} is not analysed"
        elif getattr(inst, "processable", True) is False:
            reason = getattr(inst, "reason", None) or "not processable"
        else:
            nframes = getattr(inst, "n_frames", None)
            if nframes is not None and nframes < 2:
                reason = "single frame: not a cine run"
        if reason:
            # "expected": out of scope by configuration, which keeps the SR COMPLETE.
            skipped.append({"sop_instance_uid": inst.sop_instance_uid, "reason": reason, "expected": True})
        else:
            runs.append(inst)
    return runs, skipped


def _select(ctx: NodeContext, runs) -> list[RunSelection]:
    sel = ctx.models.selector()
    c = ctx.config.selector
    out = []
    for inst in runs:
        try:
            r = sel.select_run(inst.path, min_gap=c.min_gap, max_key_frames=c.max_key_frames)
        except Exception as exc:  # one bad run never fails the study
            r = RunSelection(file=str(inst.path), sop_instance_uid=inst.sop_instance_uid, error=str(exc))
        if not r.series_instance_uid:
            r.series_instance_uid = getattr(inst, "series_instance_uid", "") or ""
        if not r.sop_class_uid:
            r.sop_class_uid = getattr(inst, "sop_class_uid", "") or ""
        out.append(r)
    return out


def _no_runs_report(selections: list[RunSelection], skipped: list[dict], languages) -> dict[str, ReportText]:
    n_err = sum(1 for r in selections if not r.ok)
    en = ReportText(
        findings=f"No coronary angiography run could be analysed ({len(selections)} run(s) examined, "
        f"{n_err} without a usable frame; {len(skipped)} instance(s) not angiography).",
        impression="No AI assessment.",
        recommendation="Review the study without AI assistance.",
    )
    ja = ReportText(
        findings=f"解析可能な冠動脈造影ランがありませんでした（{len(selections)}ランを確認、"
        f"{n_err}ランは使用可能なフレームなし、{len(skipped)}件は造影以外）。",
        impression="AI評価なし。",
        recommendation="AI支援なしで検査を読影してください。",
    )
    d = {"en": en, "ja": ja}
    return {k: d[k] for k in languages if k in d}


def _read_headers(paths: list[str]) -> list[pydicom.Dataset]:
    out = []
    for p in paths:
        try:
            out.append(pydicom.dcmread(p, stop_before_pixels=True, force=True))
        except Exception as exc:  # a header we cannot read is simply not referenced
            log.warning("cannot read header of %s: %s", os.path.basename(p), exc)
    return out


def _predecessor(ctx: NodeContext, study_uid: str) -> Optional[pydicom.Dataset]:
    """The newest SR this node delivered for the study, if any (a re-processed study
    references it).  SRs that were superseded before reaching any PACS don't count."""
    d = ctx.spool.results_dir(study_uid)
    if not d.is_dir():
        return None
    delivered = None
    outbox = ctx.outbox
    if outbox is not None:
        delivered = {r.sop_instance_uid for r in outbox.rows_for(study_uid) if r.state == OutboxState.SENT}
    srs = []
    for p in d.glob("SR_*.dcm"):
        if delivered is not None and p.stem[3:] not in delivered:
            continue
        try:
            srs.append((p.stat().st_mtime_ns, p))
        except OSError:
            pass
    if not srs:
        return None
    srs.sort()
    return pydicom.dcmread(srs[-1][1], stop_before_pixels=True)


def process_study(ctx: NodeContext, study_uid: str) -> dict:
    """Run the whole pipeline for one study.  Returns a summary (also logged)."""
    cfg = ctx.config
    journal = ctx.journal
    timer = _Timer(metrics=ctx.metrics)
    t_all = time.monotonic()
    written: list = []

    first = True

    def stage(name: str) -> None:
        nonlocal first
        if not journal.advance_stage(study_uid, name, first=first):
            raise StaleStudy(study_uid)
        first = False

    try:
        stage("frames")
        t0 = time.monotonic()
        instances = journal.study_instances(study_uid)
        runs, skipped = _classify_instances(instances, [m.upper() for m in cfg.processing.modalities])
        timer.record("frames", time.monotonic() - t0)

        stage("selector")
        t0 = time.monotonic()
        try:
            selections = run_with_timeout("selector", cfg.processing.selector_timeout_s, _select, ctx, runs) if runs else []
        except StageTimeout as exc:
            raise StageError("selector", str(exc)) from None
        timer.record("selector", time.monotonic() - t0)
        for r in selections:
            if not r.ok:
                skipped.append({"sop_instance_uid": r.sop_instance_uid, "reason": r.error or "no usable frame"})

        usable = [r for r in selections if r.ok]
        lesions: list = []
        lesion_model = None
        if usable:
            stage("lesions")
            t0 = time.monotonic()
            lesion_model = ctx.models.lesion_model()
            if lesion_model is not None:
                from inference.lesions import lesions_on_key_frames

                try:
                    lesions = run_with_timeout("lesions", cfg.processing.lesions_timeout_s, lesions_on_key_frames,
                                               lesion_model, usable, min_confidence=cfg.lesions.min_confidence)
                except StageTimeout as exc:
                    raise StageError("lesions", str(exc)) from None
            timer.record("lesions", time.monotonic() - t0)

        stage("vlm")
        t0 = time.monotonic()
        languages = list(cfg.processing.languages)
        if usable:
            backend = ctx.models.vlm()
            from inference.reporting import findings_from_lesions, templated_report

            concepts = findings_from_lesions(lesions) if lesion_model is not None else None
            if backend is None and concepts is not None:
                # no VLM: the templated draft of what the lesion model saw
                sides = sorted({r.laterality for r in usable})
                report = templated_report(concepts, sides=sides, languages=languages)
            elif backend is None:
                report = {
                    lang: ReportText(findings="", impression="", recommendation="", format_ok=False)
                    for lang in languages
                }
            else:
                from inference.keyimages import key_images
                from inference.vlm import report_study

                def _vlm_stage():
                    # the one image policy (as `cag-node report`); the concepts go only to a
                    # model trained with them
                    return report_study(backend, key_images(usable, backend.max_images), languages=languages,
                                        concepts=concepts)

                try:
                    report = run_with_timeout("vlm", cfg.processing.vlm_timeout_s, _vlm_stage)
                except StageTimeout as exc:
                    raise StageError("vlm", str(exc)) from None
        else:
            report = _no_runs_report(selections, skipped, languages)
        timer.record("vlm", time.monotonic() - t0)

        stage("encode")
        t0 = time.monotonic()
        model_info = ctx.models.bundle.model_info()
        from inference.vlm.findings import language_discrepancies

        discrepancies = language_discrepancies(report) if usable else []
        if discrepancies:
            log.warning("study %s: the language drafts disagree: %s", study_uid, "; ".join(discrepancies))
            if ctx.metrics is not None:
                ctx.metrics.draft_disagreements.inc()
        result = StudyResult(study_instance_uid=study_uid, runs=usable, report=report, model=model_info,
                             not_analysed=skipped, discrepancies=discrepancies, lesions=lesions)

        def _encode():
            from dicom_node.kos import build_kos
            from dicom_node.sr import build_sr

            headers = _read_headers([str(i.path) for i in instances])
            predecessor = _predecessor(ctx, study_uid)
            sr = build_sr(headers, result, predecessor=predecessor)
            outs = [("SR", sr)]
            if cfg.processing.send_kos and any(r.key_frames for r in usable):
                outs.append(("KO", build_kos(headers, result)))
            written = []
            for kind, ds in outs:  # durably, as storage.fsync says
                written.append((kind, str(ds.SOPInstanceUID), ctx.spool.write_result(study_uid, kind, ds)))
            return written

        try:
            written = run_with_timeout("encode", cfg.processing.encode_timeout_s, _encode)
        except StageTimeout as exc:
            raise StageError("encode", str(exc)) from None
        timer.record("encode", time.monotonic() - t0)

        # One commit: state reported + job done + outbox rows (older unsent results of
        # this study superseded).  A reopened study's results are stale: dropped.
        outbox = ctx.outbox
        items = [(sop_uid, str(path)) for _kind, sop_uid, path in written]

        def _in_tx(session):
            if outbox is not None:
                outbox.enqueue_in(session, study_uid, items, supersede=True)

        if not journal.publish_results(study_uid, _in_tx):
            raise StaleStudy(study_uid)
        timer.record("total", time.monotonic() - t_all)
        summary = {
            "study_uid": study_uid,
            "runs": len(selections),
            "analysed": len(usable),
            "not_analysed": len(skipped),
            "lesions": len(lesions),
            "discrepancies": discrepancies,
            "results": [{"kind": k, "sop_instance_uid": u, "path": str(p)} for k, u, p in written],
            "timings": timer.timings,
        }
        _save_timings(journal, study_uid, timer.timings)
        log.info("study %s reported: %d run(s) analysed, %d not; %s", study_uid, len(usable), len(skipped),
                 ", ".join(f"{k}={v:.2f}s" for k, v in timer.timings.items()))
        return summary
    except StaleStudy:
        for _kind, _uid, path in written:
            Path(path).unlink(missing_ok=True)
        log.info("study %s was reopened by a late instance during processing: results dropped, "
                 "it is processed again when complete", study_uid)
        return {"study_uid": study_uid, "stale": True, "timings": timer.timings}
    except Exception as exc:
        stage_name = exc.stage if isinstance(exc, StageError) else "pipeline"
        _save_timings(journal, study_uid, timer.timings)
        journal.fail_processing(study_uid, stage_name, str(exc)[:2000])
        log.error("study %s failed in %s: %s", study_uid, stage_name, exc)
        raise


def _save_timings(journal, study_uid: str, timings: dict) -> None:
    if timings:
        try:
            journal.set_study_timings(study_uid, timings)
        except Exception:  # timings are informative only
            log.debug("could not save timings", exc_info=True)
