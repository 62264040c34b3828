"""``cag-node retry STUDY_UID``: re-queue a study's processing and its results.

Works on the journal directly: a running node's workers pick the queued job
up within a second; otherwise it runs at the next start.  Results that the
outbox gave up on are re-queued through ``dicom_node.outbox.retry_study_db``
when the outbox module provides it.
"""

from __future__ import annotations

import importlib
import sys

from dicom_node.config import load_config


def register(sub) -> None:
    p = sub.add_parser("retry", help="re-queue a failed study's processing (and unsent results)")
    p.add_argument("study_uid", metavar="STUDY_UID")
    p.add_argument("--config", help="config.yaml (default: ./config.yaml or built-in defaults)")
    p.set_defaults(func=run)


def run(args) -> int:
    from dicom_node.journal import Journal

    cfg = load_config(args.config)
    journal = Journal(cfg.journal_url)
    try:
        st = journal.get_study(args.study_uid)
        if st is None:
            print(f"cag-node retry: unknown study {args.study_uid}", file=sys.stderr)
            return 1
        if st.state == "receiving":
            print(f"cag-node retry: study {args.study_uid} is still receiving; it is queued when complete",
                  file=sys.stderr)
            return 1
        job = journal.retry_study(args.study_uid)
        print(f"study {args.study_uid}: processing re-queued (job {job.id}, was {st.state})")
        try:
            outbox = importlib.import_module("dicom_node.outbox")
        except ModuleNotFoundError as exc:
            if exc.name != "dicom_node.outbox":
                raise
            outbox = None
        fn = getattr(outbox, "retry_study_db", None) if outbox else None
        if fn is not None:
            n = fn(journal.sessionmaker, args.study_uid)
            if n:
                print(f"study {args.study_uid}: {n} result(s) re-queued in the outbox")
    finally:
        journal.close()
    return 0
