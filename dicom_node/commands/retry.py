"""``cag-node retry STUDY_UID``: re-queue what failed for a study.

Works on the journal directly: a running node picks the work up within a
second; otherwise it runs at the next start.
- A study whose *sending* failed (stage ``outbox``) gets its existing results
  re-queued (``dicom_node.outbox.retry_study_db``): the PACS receives the same
  SR/KOS, not a second report.
- Any other failed study (or ``--reprocess``) is processed again; results of an
  earlier processing that were never delivered are superseded, never sent.
"""

from __future__ import annotations

import importlib
import sys

from dicom_node.config import load_config
from dicom_node.tables import StudyState


def register(sub) -> None:
    p = sub.add_parser("retry", help="re-queue a failed study's processing (and unsent results)")
    p.add_argument("study_uid", metavar="STUDY_UID")
    p.add_argument("--config", help="config.yaml (default: ./config.yaml or built-in defaults)")
    p.add_argument("--reprocess", action="store_true",
                   help="process the study again even if only sending failed (a new SR replaces the old)")
    p.set_defaults(func=run)


class RetryRefused(ValueError):
    """The study cannot be retried now (unknown, or still receiving)."""


def requeue(journal, study_uid: str, reprocess: bool = False) -> str:
    """Re-queue what failed for a study (the CLI and the web page's action); returns what was done.

    Raises :class:`RetryRefused` for an unknown study or one still receiving.
    """
    st = journal.get_study(study_uid)
    if st is None:
        raise RetryRefused(f"unknown study {study_uid}")
    if st.state == StudyState.RECEIVING:
        raise RetryRefused(f"study {study_uid} is still receiving; it is queued when complete")
    try:
        outbox = importlib.import_module("dicom_node.outbox")
    except ModuleNotFoundError as exc:
        if exc.name != "dicom_node.outbox":
            raise
        outbox = None
    prefix = ""
    if outbox is not None and not reprocess:
        # One commit: back to `reported` (a running node moves a study to `sent` only from
        # there) and the failed rows pending again.
        n = journal.resume_delivery(study_uid, lambda s: outbox.requeue_failed(s, study_uid),
                                    from_states=(StudyState.FAILED, StudyState.REPORTED), stage="outbox")
        if n:
            return f"study {study_uid}: {n} result(s) re-queued for sending"
        if n == 0:
            prefix = f"study {study_uid}: no unsent result to re-queue; processing again\n"
    job = journal.retry_study(study_uid)
    return prefix + f"study {study_uid}: processing re-queued (job {job.id}, was {st.state})"


def run(args) -> int:
    from dicom_node.journal import Journal

    cfg = load_config(args.config)
    journal = Journal(cfg.journal_url)
    try:
        try:
            print(requeue(journal, args.study_uid, reprocess=args.reprocess))
        except RetryRefused as exc:
            print(f"cag-node retry: {exc}", file=sys.stderr)
            return 1
    finally:
        journal.close()
    return 0
