"""Helpers of the MPPS / UPS tests: real pynetdicom SCU associations on loopback."""

from __future__ import annotations

import threading

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt

from dicom_node import ups
from dicom_node.scu import dimse_status
from cagtest.dicom import dataset
from cagtest.net import wait_for  # noqa: F401  (the workflow tests import it from here)

MPPS = "1.2.840.10008.3.1.2.3.3"
UPS_PUSH = "1.2.840.10008.5.1.4.34.6.1"
UPS_WATCH = "1.2.840.10008.5.1.4.34.6.2"
UPS_PULL = "1.2.840.10008.5.1.4.34.6.3"
UPS_EVENT = "1.2.840.10008.5.1.4.34.6.4"


class SCU:
    """One association proposing the MPPS and UPS SOP classes."""

    def __init__(self, port: int, aet: str = "MODALITY", aec: str = "CAGNODE"):
        ae = AE(ae_title=aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        for c in (MPPS, UPS_PUSH, UPS_WATCH, UPS_PULL):
            ae.add_requested_context(c)
        self.assoc = ae.associate("127.0.0.1", port, ae_title=aec)

    def __enter__(self):
        assert self.assoc.is_established, "association not established"
        return self

    def __exit__(self, *exc):
        if self.assoc.is_established:
            self.assoc.release()

    def n_create(self, ds, cls, uid):
        st, attrs = self.assoc.send_n_create(ds, cls, uid)
        return dimse_status(st), attrs

    def n_set(self, ds, cls, uid):
        st, attrs = self.assoc.send_n_set(ds, cls, uid)
        return dimse_status(st), attrs

    def n_action(self, ds, action, cls, uid):
        st, reply = self.assoc.send_n_action(ds, action, cls, uid)
        return dimse_status(st), reply

    def n_get(self, tags, cls, uid):
        st, ds = self.assoc.send_n_get(tags, cls, uid)
        return dimse_status(st), ds

    def c_find(self, query, cls=UPS_PULL):
        out = []
        for st, ds in self.assoc.send_c_find(query, cls):
            if st is not None and int(st.Status) in (0xFF00, 0xFF01):
                out.append(ds)
            elif st is not None:
                final = int(st.Status)
        return final, out


def mpps_create_ds(study_uid: str) -> Dataset:
    return dataset(PerformedProcedureStepStatus="IN PROGRESS", Modality="XA", PerformedProcedureStepID="PPS1",
                   PerformedStationAETitle="MODALITY", PerformedProcedureStepStartDate="20260101",
                   PerformedProcedureStepStartTime="101010", PerformedSeriesSequence=[],
                   ScheduledStepAttributesSequence=[dataset(StudyInstanceUID=study_uid, AccessionNumber="")])


def mpps_set_ds(status: str, series: dict[str, list[str]], sop_class: str) -> Dataset:
    return dataset(
        PerformedProcedureStepStatus=status, PerformedProcedureStepEndDate="20260101",
        PerformedProcedureStepEndTime="111111",
        PerformedSeriesSequence=[dataset(
            SeriesInstanceUID=series_uid, RetrieveAETitle="MODALITY",
            ReferencedImageSequence=[dataset(ReferencedSOPClassUID=sop_class, ReferencedSOPInstanceUID=uid)
                                     for uid in sops],
            ReferencedNonImageCompositeSOPInstanceSequence=[]) for series_uid, sops in series.items()])


class RecordingNSCP:
    """A pynetdicom SCP recording N-EVENT-REPORTs (a UPS watcher) and MPPS N-CREATE/N-SET (a RIS)."""

    def __init__(self, ae_title: str = "WATCHER"):
        self.events: list[tuple[str, int, Dataset]] = []
        self.mpps: list[tuple[str, str, Dataset]] = []
        self.calling: list[str] = []
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        ae.add_supported_context(UPS_EVENT)
        ae.add_supported_context(MPPS)
        handlers = [(evt.EVT_N_EVENT_REPORT, self._on_event), (evt.EVT_N_CREATE, self._on_create),
                    (evt.EVT_N_SET, self._on_set)]
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        self.port = self.server.server_address[1]

    def _on_event(self, event):
        with self._lock:
            self.calling.append(str(event.assoc.requestor.ae_title).strip())
            self.events.append((str(event.request.AffectedSOPInstanceUID), int(event.event_type),
                                event.event_information))
        return 0x0000, None

    def _on_create(self, event):
        with self._lock:
            self.mpps.append(("create", str(event.request.AffectedSOPInstanceUID), event.attribute_list))
        return 0x0000, event.attribute_list

    def _on_set(self, event):
        with self._lock:
            self.mpps.append(("set", str(event.request.RequestedSOPInstanceUID), event.modification_list))
        return 0x0000, event.modification_list

    def states(self, uid: str) -> list[str]:
        with self._lock:
            return [str(i.ProcedureStepState) for u, t, i in self.events if u == uid and t == 1]

    def of_type(self, uid: str, etype: int) -> list[Dataset]:
        with self._lock:
            return [i for u, t, i in self.events if u == uid and t == etype]

    def stop(self):
        self.server.shutdown()


# -- UPS data sets -------------------------------------------------------------------
def work_item(study_uid: str, label: str = "CAG AI report") -> Dataset:
    """A SCHEDULED work item as a RIS would push it (dicom_node.ups.work_item, with a patient)."""
    return ups.work_item(study_uid, label=label, worklist="AI", priority="HIGH", start="20260101101010",
                         PatientName="Test^Synthetic", PatientID="SYN0001")


def change(state: str, txn: str) -> Dataset:
    return dataset(ProcedureStepState=state, TransactionUID=txn)


def subscribe(ae: str, lock: bool = False) -> Dataset:
    return dataset(ReceivingAE=ae, DeletionLock="TRUE" if lock else "FALSE")


def progress(txn: str, pct: int, text: str = "") -> Dataset:
    return dataset(TransactionUID=txn, ProcedureStepProgressInformationSequence=[
        dataset(ProcedureStepProgress=pct, ProcedureStepProgressDescription=text)])


def outputs(txn: str, study: str, sr_uid: str) -> Dataset:
    ref = dataset(ReferencedSOPClassUID="1.2.840.10008.5.1.4.1.1.88.33", ReferencedSOPInstanceUID=sr_uid)
    out = dataset(TypeOfInstances="DICOM", StudyInstanceUID=study, SeriesInstanceUID=generate_uid(),
                  ReferencedSOPSequence=[ref])
    return dataset(TransactionUID=txn, UnifiedProcedureStepPerformedProcedureSequence=[
        dataset(PerformedProcedureStepStartDateTime="20260101101011", OutputInformationSequence=[out])])
