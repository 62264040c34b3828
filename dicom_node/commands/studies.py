"""``cag-node studies``: one row per study the journal knows.

Works on the journal directly (no running node needed), so it is safe to run
beside a serving node (SQLite WAL allows concurrent readers).
"""

from __future__ import annotations

import json

from dicom_node.config import load_config


def register(sub) -> None:
    p = sub.add_parser("studies", help="list studies: UID, state, instances, last error")
    p.add_argument("--config", help="config.yaml (default: ./config.yaml or built-in defaults)")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=run)


def run(args) -> int:
    from dicom_node.journal import Journal

    cfg = load_config(args.config)
    journal = Journal(cfg.journal_url)
    outbox_rows: dict[str, list[dict]] = {}
    try:
        from dicom_node.mpps import mpps_by_study
        from dicom_node.ups import ups_by_study

        studies = journal.list_studies()
        mpps = mpps_by_study(journal.sessionmaker)
        ups = ups_by_study(journal.sessionmaker)
        if args.json:
            outbox_rows = _outbox_rows(journal)
    finally:
        journal.close()
    if args.json:
        rows = [{
            "study_uid": s.study_uid, "state": s.state, "stage": s.stage, "n_instances": s.n_instances,
            "error": s.error, "first_received": s.first_received.isoformat(),
            "last_received": s.last_received.isoformat(),
            "completed_at": s.completed_at.isoformat() if s.completed_at else None,
            "timings": s.timings,
            "outbox": outbox_rows.get(s.study_uid, []),
            "mpps": mpps.get(s.study_uid, []),
            "ups": ups.get(s.study_uid, []),
        } for s in studies]
        print(json.dumps(rows, indent=2))
        return 0
    if not studies:
        print("no studies")
        return 0
    w = max(len("StudyInstanceUID"), *(len(s.study_uid) for s in studies))
    print(f"{'StudyInstanceUID':<{w}}  {'state':<10}  {'n':>5}  {'stage':<10}  {'mpps':<22}  error")
    for s in studies:
        err = (s.error or "").replace("\n", " ")
        pps = mpps.get(s.study_uid, [])
        last = pps[-1] if pps else None
        if last is not None and last["completion"] == "timed_out":
            err = f"MPPS: {last['note']}" + (f"; {err}" if err else "")
        if len(err) > 100:
            err = err[:97] + "..."
        col = f"{last['state']}/{last['completion']}" if last else ""
        print(f"{s.study_uid:<{w}}  {s.state:<10}  {s.n_instances:>5}  {(s.stage or ''):<10}  {col:<22}  {err}")
    return 0


def _outbox_rows(journal) -> dict[str, list[dict]]:
    """Each study's results and their delivery per destination (no PHI: UIDs and states)."""
    import sqlalchemy as sa

    from dicom_node.tables import OutboxRow

    out: dict[str, list[dict]] = {}
    with journal.sessionmaker() as s:
        for r in s.scalars(sa.select(OutboxRow).order_by(OutboxRow.id)):
            out.setdefault(r.study_uid, []).append({
                "sop_instance_uid": r.sop_instance_uid, "destination": r.destination, "state": r.state,
                "attempts": r.attempts, "last_status": r.last_status, "last_error": r.last_error,
            })
    return out
