"""The web face: STOW-RS vs C-STORE throughput on one node in the same run, and the
studies page's load time with 1,000 studies in the journal.

    .venv/bin/python bench/web.py [--quick] [--studies 1000]

1. One in-process node (processing off, web on loopback).  Two sets of the same
   size of multi-frame 8-bit XA runs (distinct UIDs) are generated; set A is sent
   by C-STORE (pynetdicom, one association, chunked from disk: bytes as stored),
   set B by STOW-RS (``requests``, one multipart/related request per batch of
   4 instances).  Both end on the same durable path (``StorageSCP.store``: fsync +
   rename + journal before the answer).  Prints MB/s of each and the ratio STOW/C-STORE.
2. A second node whose journal holds ``--studies`` studies (one instance each, with
   two outbox rows per study): median wall time of ``GET /studies`` (first page,
   ``web.page_size`` 200), of all of them on one page (page_size = the count),
   and of one study's page.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test-support package cagtest
from cagtest.web import make_dataset, pyscu_send, stow_body, web_config, write_dataset  # noqa: E402


def _make(d: Path, n: int, frames: int, size: int, seed0: int) -> list[Path]:
    from pydicom.uid import generate_uid

    study, series = generate_uid(), generate_uid()
    return [write_dataset(make_dataset(study, series, frames=frames, size=size, seed=seed0 + i), d / f"{i}.dcm")
            for i in range(n)]


def throughput(tmp: Path, n: int, frames: int, size: int, rounds: int) -> None:
    from dicom_node.node import Node

    node = Node(web_config(tmp / "t")).start()
    try:
        cs, stw = [], []
        for r in range(rounds):
            a = _make(tmp / f"a{r}", n, frames, size, 1000 * r)
            b = _make(tmp / f"b{r}", n, frames, size, 1000 * r + 500)
            mb = sum(p.stat().st_size for p in a) / 1e6
            for order in ((("cstore", a), ("stow", b)) if r % 2 == 0 else (("stow", b), ("cstore", a))):
                kind, files = order
                t0 = time.perf_counter()
                if kind == "cstore":
                    st = pyscu_send(node.port, files)
                    assert st == [0] * len(files), st
                    cs.append(mb / (time.perf_counter() - t0))
                else:
                    with requests.Session() as s:
                        for i in range(0, len(files), 4):
                            body, h = stow_body(files[i:i + 4])
                            resp = s.post(node.web.url + "/dicomweb/studies", data=body, headers=h, timeout=300)
                            assert resp.status_code == 200, resp.text
                    stw.append(mb / (time.perf_counter() - t0))
        total = node.journal.count_instances()
        assert total == 2 * n * rounds, total
        mc, ms = statistics.median(cs), statistics.median(stw)
        print(f"throughput: {n} x {frames}x{size}x{size} 8-bit ({mb:.0f} MB) per method per round, {rounds} rounds, "
              f"alternating order")
        print(f"  C-STORE (pynetdicom, 1 association): median {mc:.1f} MB/s  (rounds: "
              f"{', '.join(f'{x:.1f}' for x in cs)})")
        print(f"  STOW-RS (requests, 4 instances/request): median {ms:.1f} MB/s  (rounds: "
              f"{', '.join(f'{x:.1f}' for x in stw)})")
        print(f"  ratio STOW-RS / C-STORE: {ms / mc:.2f}")
    finally:
        node.stop(grace_s=1)


def _seed_journal(node, n: int) -> str:
    import datetime as dt

    from pydicom.uid import generate_uid

    from dicom_node.journal import Instance, Series, Study
    from dicom_node.outbox import OutboxRow

    now = dt.datetime.now(dt.timezone.utc)
    states = ["sent"] * 8 + ["failed", "reported"]
    with node.journal.sessionmaker.begin() as s:
        for i in range(n):
            st, se, sop = generate_uid(), generate_uid(), generate_uid()
            t = now - dt.timedelta(minutes=n - i)
            state = states[i % len(states)]
            s.add(Study(study_uid=st, state=state, stage="outbox" if state == "failed" else None,
                        error="pacs: association rejected" if state == "failed" else None, n_instances=1,
                        first_received=t, last_received=t, completed_at=t, updated_at=t,
                        timings={"selector": 1.2, "vlm": 8.0, "total": 10.1}))
            s.flush()  # the study row before its instance (foreign key)
            s.add(Series(series_uid=se, study_uid=st, modality="XA", n_instances=1))
            s.add(Instance(sop_instance_uid=sop, study_uid=st, series_uid=se, sop_class_uid="1.2.840.10008.5.1.4.1.1.12.1",
                           modality="XA", transfer_syntax="1.2.840.10008.1.2.1", path="/nonexistent", size=1,
                           n_frames=30, received_at=t, processable=True))
            for kind in ("SR", "KO"):
                s.add(OutboxRow(study_uid=st, sop_instance_uid=generate_uid(), path=f"/x/{kind}_1.dcm",
                                destination="pacs", state="sent" if state == "sent" else "failed", attempts=1,
                                created_at=t.replace(tzinfo=None), queued_at=t.replace(tzinfo=None),
                                next_attempt_at=t.replace(tzinfo=None)))
    return st


def page_load(tmp: Path, n: int, reps: int = 15) -> None:
    from dicom_node.node import Node

    for page_size, label in ((200, "first page (200 rows)"), (n, f"all {n} rows on one page")):
        d = tmp / f"p{page_size}"
        node = Node(web_config(d, web={"enabled": True, "port": 0, "page_size": page_size},
                               destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                                              "port": 1}])).start()
        try:
            last = _seed_journal(node, n)
            with requests.Session() as s:
                s.get(node.web.url + "/studies")  # warm-up (templates compiled)
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    r = s.get(node.web.url + "/studies")
                    times.append(time.perf_counter() - t0)
                    assert r.status_code == 200 and r.text.count('class="study"') == min(page_size, n)
                print(f"  GET /studies, {label}: median {statistics.median(times) * 1000:.0f} ms, "
                      f"max {max(times) * 1000:.0f} ms, {len(r.content) / 1e3:.0f} kB")
                if page_size == 200:
                    t2 = []
                    for _ in range(reps):
                        t0 = time.perf_counter()
                        r = s.get(node.web.url + f"/studies/{last}")
                        t2.append(time.perf_counter() - t0)
                        assert r.status_code == 200
                    print(f"  GET /studies/{{uid}} (one study, no results): median {statistics.median(t2) * 1000:.0f} ms")
                    t3 = []
                    for _ in range(5):
                        t0 = time.perf_counter()
                        r = s.get(node.web.url + "/dicomweb/studies?limit=100")
                        t3.append(time.perf_counter() - t0)
                    print(f"  GET /dicomweb/studies?limit=100 (QIDO over {n}): median "
                          f"{statistics.median(t3) * 1000:.0f} ms")
        finally:
            node.stop(grace_s=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller instances, fewer rounds")
    ap.add_argument("--studies", type=int, default=1000)
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        if args.quick:
            throughput(tmp, n=8, frames=30, size=512, rounds=2)
        else:
            throughput(tmp, n=12, frames=60, size=512, rounds=3)
        print(f"page load with {args.studies} studies in the journal (requests on loopback, {args.studies} "
              "studies, 2 outbox rows each):")
        page_load(tmp, args.studies)
    return 0


if __name__ == "__main__":
    sys.exit(main())
