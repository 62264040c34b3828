"""Study completion latency: MPPS COMPLETED vs the quiet period, in the same run.

    PYTHONPATH=. .venv/bin/python bench/mpps_latency.py [--quiet 10] [--rounds 3] [--runs 3]
                                                        [--bundle models/demo]

One in-process node (``Node``: the real listener, journal, completion scheduler,
MPPS SCP and outbox) and one destination (a pynetdicom Storage SCP recording when
each SR arrives).  Each round sends two studies of ``--runs`` XA runs over real
associations:

* study M: MPPS N-CREATE, the instances, MPPS N-SET COMPLETED listing them;
  measured from the N-SET response to the SR at the destination;
* study Q: the instances only; measured from the last instance's acknowledgement
  to the SR at the destination (the quiet-period path).

Processing is a stub that writes a one-item Basic Text SR and queues it in the
outbox like the pipeline does (same commit), so the numbers are the completion
and delivery latencies, not model time; ``--bundle`` runs the real pipeline
instead (its processing time is then added to both paths equally; a first warm-up
study, not counted, loads the models).  Prints each
round, the medians and the ratio quiet/MPPS.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402
from pynetdicom import AE, evt  # noqa: E402

from dicom_node.config import parse_config  # noqa: E402
from dicom_node.node import Node  # noqa: E402
from cagtest.dicom import XA_CLASS, make_dataset, pyscu_send, write_dataset
from cagtest.node import node_config
from cagtest.workflow import MPPS, SCU, mpps_create_ds, mpps_set_ds  # noqa: E402

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


class Destination:
    def __init__(self):
        self.arrived: dict[str, float] = {}
        self.cond = threading.Condition()
        ae = AE(ae_title="PACS")
        ae.add_supported_context(BASIC_TEXT_SR, ExplicitVRLittleEndian)
        ae.add_supported_context("1.2.840.10008.5.1.4.1.1.88.33", ExplicitVRLittleEndian)
        ae.add_supported_context("1.2.840.10008.5.1.4.1.1.88.22", ExplicitVRLittleEndian)
        ae.add_supported_context("1.2.840.10008.5.1.4.1.1.88.59", ExplicitVRLittleEndian)
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.port = self.server.server_address[1]

    def _on_store(self, event):
        study = str(event.dataset.StudyInstanceUID)
        with self.cond:
            self.arrived.setdefault(study, time.monotonic())
            self.cond.notify_all()
        return 0x0000

    def wait(self, study: str, timeout: float) -> float:
        with self.cond:
            self.cond.wait_for(lambda: study in self.arrived, timeout)
            return self.arrived[study]


def stub_process(ctx, study_uid: str) -> dict:
    """A one-item SR, queued in the outbox in the publishing commit (as the pipeline does)."""
    ctx.journal.advance_stage(study_uid, "encode")
    ds = Dataset()
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "PARTIAL"
    ds.VerificationFlag = "UNVERIFIED"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    p = ctx.spool.write_result(study_uid, "SR", ds)
    ctx.journal.publish_results(study_uid, lambda s: ctx.outbox.enqueue_in(
        s, study_uid, [(str(ds.SOPInstanceUID), str(p))], supersede=True))
    return {"results": [{"kind": "SR", "sop_instance_uid": str(ds.SOPInstanceUID), "path": str(p)}]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quiet", type=float, default=10.0, help="completion.quiet_seconds")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3, help="XA runs per study")
    ap.add_argument("--poll", type=float, default=0.5, help="outbox.poll_s")
    ap.add_argument("--bundle", help="use the real pipeline with this model bundle")
    args = ap.parse_args()

    dest = Destination()
    tmp = Path(tempfile.mkdtemp(prefix="mpps-bench-"))
    over = dict(completion__quiet_seconds=args.quiet, processing__enabled=True,
                destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": dest.port}],
                outbox={"poll_s": args.poll, "retry_base_s": 0.2})
    if args.bundle:
        over["models__bundle"] = str(Path(args.bundle).resolve())
    cfg = parse_config(node_config(tmp, **over), base_dir=tmp)
    node = Node(cfg, process_fn=None if args.bundle else stub_process).start()
    mpps_s, quiet_s = [], []
    timeout = args.quiet + 600
    try:
        # with the real pipeline, a first study loads the models (lazily): not counted
        for r in range(-1 if args.bundle else 0, args.rounds):
            files = {}
            for kind in ("M", "Q"):
                study, series = generate_uid(), generate_uid()
                dss = [make_dataset(study, series, seed=i, frames=8, size=128) for i in range(args.runs)]
                files[kind] = (study, series, dss, [write_dataset(d, tmp / f"{r}{kind}{i}.dcm")
                                                    for i, d in enumerate(dss)])
            # MPPS path
            study, series, dss, paths = files["M"]
            uid = generate_uid()
            with SCU(node.port) as scu:
                assert scu.n_create(mpps_create_ds(study), MPPS, uid)[0] == 0
                assert pyscu_send(node.port, paths) == [0] * len(paths)
                done = mpps_set_ds("COMPLETED", {series: [str(d.SOPInstanceUID) for d in dss]}, XA_CLASS)
                assert scu.n_set(done, MPPS, uid)[0] == 0
                t0 = time.monotonic()
            mpps_s.append(dest.wait(study, timeout) - t0)
            if r < 0:
                mpps_s.pop()
                print(f"warm-up (model loading): {dest.arrived[study] - t0:.2f}s", flush=True)
                continue
            # quiet-period path
            study, series, dss, paths = files["Q"]
            assert pyscu_send(node.port, paths) == [0] * len(paths)
            t0 = time.monotonic()
            quiet_s.append(dest.wait(study, timeout) - t0)
            print(f"round {r + 1}: MPPS COMPLETED -> SR at destination {mpps_s[-1]:.2f}s; "
                  f"last instance -> SR (quiet {args.quiet:g}s) {quiet_s[-1]:.2f}s", flush=True)
    finally:
        node.stop(grace_s=2)
        dest.server.shutdown()
    m, q = statistics.median(mpps_s), statistics.median(quiet_s)
    print(f"median: MPPS {m:.2f}s, quiet period {q:.2f}s; ratio quiet/MPPS {q / m:.1f}x "
          f"({args.rounds} rounds, {args.runs} runs/study, outbox.poll_s {args.poll:g}, "
          f"{'pipeline ' + args.bundle if args.bundle else 'stub processing'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
