"""``cag-node demo``: the main job, end to end on one machine.

1. Build the demo model bundle if it is absent (through the ``cag_node.demo``
   entry points that the training module provides: synthetic data → selector →
   ONNX → tiny VLM).
2. Start a real node (the shipped config, with its own spool/journal under the
   demo output folder and a short quiet period).
3. Start a destination PACS: a plain storage SCP (or, with ``--pacs``, a real
   Orthanc that forwards the study to the node and receives the SR back).
4. Send a held-out synthetic study to the node over DICOM.
5. Wait for the SR and KOS to land, print the report in both languages, where
   the objects went, and render the SR to HTML.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import socket
import sys
import threading
import time
from importlib.metadata import entry_points
from pathlib import Path

import pydicom

from dicom_node.config import Config
from dicom_node.tables import StudyState

log = logging.getLogger(__name__)

DEMO_PACS_AET = "DEMOPACS"
DEMO_MODALITY_AET = "MODALITY"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _demo_hooks():
    eps = {ep.name: ep for ep in entry_points(group="cag_node.demo")}
    missing = {"build_bundle", "make_study"} - set(eps)
    if missing:
        raise RuntimeError("the demo needs the training module (pip install -e '.[train]'): "
                           f"entry points {sorted(missing)} not found")
    return eps["build_bundle"].load(), eps["make_study"].load()


def ensure_bundle(bundle_dir: Path, quick: bool = False) -> bool:
    """Build the demo bundle unless a valid one is there.  Returns True when it was built."""
    from inference.bundle import Bundle, BundleError

    try:
        Bundle.load(bundle_dir)
        return False
    except BundleError:
        pass
    build_bundle, _ = _demo_hooks()
    print(f"== building the demo model bundle into {bundle_dir} (once; minutes on 2 CPU cores)", flush=True)
    summary = build_bundle(bundle_dir, quick=quick)
    print("== bundle built: " + json.dumps(summary.get("seconds", {})), flush=True)
    held = (summary.get("heldout") or {}).get("summary")
    if held:
        print("== measured on held-out synthetic studies: " + json.dumps(held), flush=True)
    return True


class DemoPACS:
    """A minimal storage SCP standing in for the PACS: stores what it receives."""

    def __init__(self, out_dir: Path, port: int, ae_title: str = DEMO_PACS_AET):
        from pynetdicom import AE, evt
        from pynetdicom.presentation import AllStoragePresentationContexts

        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.received: list[Path] = []
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context("1.2.840.10008.1.1")
        self._ae = ae
        self._handlers = [(evt.EVT_C_STORE, self._on_store)]
        self._server = None

    def _on_store(self, event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        p = self.out_dir / f"{ds.Modality}_{ds.SOPInstanceUID}.dcm"
        ds.save_as(p, enforce_file_format=True)
        with self._lock:
            self.received.append(p)
        return 0x0000

    def start(self) -> None:
        self._server = self._ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=self._handlers)

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()


def send_files(files: list[Path], host: str, port: int, called: str, calling: str) -> list[int]:
    """Send files on one association; returns the DIMSE status of each."""
    from pynetdicom import AE

    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title=calling)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate(host, port, ae_title=called)
    if not assoc.is_established:
        raise RuntimeError(f"association to {called}@{host}:{port} failed")
    statuses = []
    try:
        for ds in datasets:
            st = assoc.send_c_store(ds)
            statuses.append(int(st.Status) if st else -1)
    finally:
        assoc.release()
    return statuses


def _sr_text(path: Path) -> dict[str, dict[str, str]]:
    """The per-language report texts of an SR, by concept meaning (for printing)."""
    from dicom_node.sr_templates import CagReport

    doc = CagReport.from_dataset(pydicom.dcmread(path))
    return {n.language: n.by_meaning() for n in doc.narratives}


def _print_reference(studies_jsonl: Path) -> None:
    """The synthetic study's ground truth, to compare the draft with."""
    try:
        rec = json.loads(studies_jsonl.read_text(encoding="utf-8").splitlines()[0])
        ref = rec["report"]["en"]
    except (OSError, ValueError, KeyError, IndexError):
        return
    print("\n[reference: the synthetic study's ground truth, en]")
    for name in ("findings", "impression", "recommendation"):
        if ref.get(name):
            print(f"  {name}: {ref[name]}")


def run_demo(cfg: Config, bundle_dir: Path, out_dir: Path, prepare_only: bool = False,
             use_orthanc: bool = False, quick: bool = False, timeout_s: float = 600) -> int:
    from dicom_node.config import parse_config
    from dicom_node.logging_setup import setup_logging
    from dicom_node.node import Node

    ensure_bundle(bundle_dir, quick=quick)
    if prepare_only:
        print(f"demo bundle ready at {bundle_dir}")
        return 0

    _, make_study = _demo_hooks()
    out_dir = Path(out_dir).resolve()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)

    node_port, pacs_port = free_port(), free_port()
    data = cfg.model_dump(mode="json", exclude={"base_dir"})
    data = copy.deepcopy(data)
    data["node"]["port"] = node_port
    data["node"]["allowed_calling_aets"] = sorted(set(data["node"]["allowed_calling_aets"]) |
                                                  {DEMO_MODALITY_AET, "ORTHANC"})
    data["storage"]["path"] = str(out_dir / "spool")
    data["storage"]["journal"] = f"sqlite:///{out_dir / 'journal.db'}"
    data["storage"]["min_free_mb"] = min(data["storage"]["min_free_mb"], 256)
    data["completion"]["quiet_seconds"] = 2
    data["models"]["bundle"] = str(Path(bundle_dir).resolve())
    data["admin"]["port"] = 0
    data["outbox"]["retry_base_s"] = 1
    data["outbox"]["poll_s"] = 0.5

    orthanc = None
    pacs = None
    if use_orthanc:
        from dicom_node.orthanc import OrthancProcess

        orthanc = OrthancProcess(out_dir / "orthanc", dicom_port=pacs_port, node_aet=cfg.node.ae_title,
                                 node_port=node_port)
        data["destinations"] = [{"name": "orthanc", "ae_title": orthanc.aet, "host": "127.0.0.1",
                                 "port": pacs_port}]
    else:
        pacs = DemoPACS(out_dir / "pacs", pacs_port)
        data["destinations"] = [{"name": "demo-pacs", "ae_title": DEMO_PACS_AET, "host": "127.0.0.1",
                                 "port": pacs_port}]
    node_cfg = parse_config(data, base_dir=cfg.base_dir, source="(demo)")
    setup_logging(node_cfg)

    study_files = make_study(out_dir / "study", quick=quick)
    study_uid = str(pydicom.dcmread(study_files[0], stop_before_pixels=True).StudyInstanceUID)
    print(f"== demo study: {len(study_files)} run(s), StudyInstanceUID {study_uid}", flush=True)

    node = Node(node_cfg)
    node.start()
    try:
        if pacs:
            pacs.start()
            t0 = time.monotonic()
            statuses = send_files(study_files, "127.0.0.1", node_port, node_cfg.node.ae_title, DEMO_MODALITY_AET)
            print(f"== sent {len(statuses)} instance(s) to {node_cfg.node.ae_title}@127.0.0.1:{node_port}: "
                  f"statuses {sorted(set(hex(s) for s in statuses))}", flush=True)
        else:
            orthanc.start()
            t0 = time.monotonic()
            ids = [orthanc.upload(f) for f in study_files]
            orthanc.send_to_node(ids)
            print(f"== Orthanc forwarded {len(ids)} instance(s) to the node", flush=True)

        state = None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            st = node.journal.get_study(study_uid)
            state = getattr(st, "state", None)
            if state in (StudyState.SENT, StudyState.FAILED):
                break
            time.sleep(0.5)
        elapsed = time.monotonic() - t0
        st = node.journal.get_study(study_uid)
        if state != StudyState.SENT:
            print(f"demo: study ended in state {state!r} after {elapsed:.0f} s: {getattr(st, 'error', '')}",
                  file=sys.stderr)
            return 1
    finally:
        node.stop()
        if pacs:
            pacs.stop()

    # Where did the results go?
    if pacs:
        landed = sorted(pacs.received)
        where = f"{DEMO_PACS_AET}@127.0.0.1:{pacs_port} -> {pacs.out_dir}"
    else:
        landed = orthanc.download_results(study_uid, out_dir / "pacs")
        where = f"Orthanc {orthanc.aet}@127.0.0.1:{pacs_port} (REST http://127.0.0.1:{orthanc.http_port})"
        orthanc.stop()
    srs = [p for p in landed if p.name.startswith("SR_")]
    kos = [p for p in landed if p.name.startswith("KO_")]
    if not srs:
        print("demo: no SR arrived at the destination", file=sys.stderr)
        return 1
    texts = _sr_text(srs[-1])
    print(f"\n== report for study {study_uid} ({elapsed:.1f} s from sending, quiet period 2 s)")
    for lang in ("en", "ja"):
        sections = texts.get(lang, {})
        if not sections:
            continue
        print(f"\n[{lang}]")
        for name, text in sections.items():
            print(f"  {name}: {text}")
    _print_reference(out_dir / "study" / "studies.jsonl")
    print(f"\n== SR  -> {where}: {', '.join(p.name for p in srs)}")
    print(f"== KOS -> {where}: {', '.join(p.name for p in kos) or '(none)'}")
    html = out_dir / "report.html"
    try:
        from dicom_node.sr import render_html

        render_html(srs[-1], html)
        print(f"== SR rendered to {html}")
    except Exception as exc:  # rendering is a convenience
        print(f"== (could not render the SR to HTML: {exc})")
    return 0
