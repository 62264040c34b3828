"""DIMSE-N handlers of the workflow services (MPPS, UPS), kept thin.

Why a separate module: the C-STORE listener (``dicom_node.scp``) is about
reception speed; these handlers only translate pynetdicom events into calls of
``MPPSService`` / ``UPSService`` and their ``*Error`` exceptions into DIMSE
statuses.  Any other exception becomes 0x0110 (N-*) or 0xC000 (C-FIND) and is
logged: a bad request never takes the node down.  They run on the same AE as
C-STORE, so the association policy (called AE, calling-AE allow-list,
allowed hosts) applies to them unchanged.
"""

from __future__ import annotations

import logging
from typing import Optional

from pydicom.dataset import Dataset

from dicom_node import mpps as m
from dicom_node import ups as u

log = logging.getLogger(__name__)

ST_PROCESSING_FAILURE = 0x0110
ST_NO_SUCH_SOP_CLASS = 0x0118
ST_C_FIND_UNABLE = 0xC000


def _calling(event) -> str:
    return str(event.assoc.requestor.ae_title).strip()


def _class(event) -> str:
    return str(event.context.abstract_syntax)


class WorkflowHandlers:
    def __init__(self, mpps: Optional[m.MPPSService], ups: Optional[u.UPSService]):
        self.mpps = mpps
        self.ups = ups

    def sop_classes(self) -> list[str]:
        out = []
        if self.mpps is not None:
            out.append(m.MPPS_CLASS)
        if self.ups is not None:
            out.extend([u.UPS_PUSH, u.UPS_PULL, u.UPS_WATCH, u.UPS_EVENT, u.UPS_QUERY])
        return out

    def handlers(self) -> list:
        from pynetdicom import evt

        return [(evt.EVT_N_CREATE, self.on_n_create), (evt.EVT_N_SET, self.on_n_set),
                (evt.EVT_N_ACTION, self.on_n_action), (evt.EVT_N_GET, self.on_n_get),
                (evt.EVT_C_FIND, self.on_c_find)]

    # -- handlers -----------------------------------------------------------------
    def _guard(self, what: str, event, fn):
        try:
            return fn()
        except (m.MPPSError, u.UPSError) as exc:
            log.warning("%s from %s refused 0x%04X: %s", what, _calling(event), exc.status, exc.comment)
            return exc.status_dataset(), None
        except Exception:
            log.exception("%s from %s failed", what, _calling(event))
            return ST_PROCESSING_FAILURE, None

    def on_n_create(self, event):
        cls = _class(event)
        uid = event.request.AffectedSOPInstanceUID
        uid = str(uid) if uid else None

        def run():
            attrs = event.attribute_list
            if cls == m.MPPS_CLASS and self.mpps is not None:
                self.mpps.n_create(uid, attrs, _calling(event))
                return 0x0000, attrs
            if cls == u.UPS_PUSH and self.ups is not None:
                new = self.ups.create(uid, attrs, _calling(event))
                ds = Dataset()
                if uid is None:
                    ds.AffectedSOPInstanceUID = new
                return 0x0000, ds
            return ST_NO_SUCH_SOP_CLASS, None

        return self._guard("N-CREATE", event, run)

    def on_n_set(self, event):
        cls = _class(event)
        uid = str(event.request.RequestedSOPInstanceUID or "") or None

        def run():
            mods = event.modification_list
            if cls == m.MPPS_CLASS and self.mpps is not None:
                self.mpps.n_set(uid, mods, _calling(event))
                return 0x0000, mods
            if cls in (u.UPS_PULL, u.UPS_PUSH) and self.ups is not None:
                self.ups.set(uid, mods, _calling(event))
                return 0x0000, None
            return ST_NO_SUCH_SOP_CLASS, None

        return self._guard("N-SET", event, run)

    def on_n_action(self, event):
        uid = str(event.request.RequestedSOPInstanceUID or "")
        action = event.action_type

        def run():
            if self.ups is None:
                return ST_NO_SUCH_SOP_CLASS, None
            info = event.action_information or Dataset()
            by = _calling(event)
            if action == u.A_CHANGE_STATE:
                status = self.ups.change_state(uid, str(info.get("ProcedureStepState", "") or ""),
                                               str(info.get("TransactionUID", "") or "") or None, by)
            elif action == u.A_REQUEST_CANCEL:
                status = self.ups.request_cancel(uid, info, by)
            elif action == u.A_SUBSCRIBE:
                lock = str(info.get("DeletionLock", "FALSE") or "FALSE").upper() == "TRUE"
                self.ups.subscribe(uid, str(info.get("ReceivingAE", "") or ""), lock)
                status = 0x0000
            elif action == u.A_UNSUBSCRIBE:
                self.ups.unsubscribe(uid, str(info.get("ReceivingAE", "") or "") or by)
                status = 0x0000
            elif action == u.A_SUSPEND_GLOBAL:
                self.ups.unsubscribe(uid, str(info.get("ReceivingAE", "") or "") or by, suspend_only=True)
                status = 0x0000
            else:
                return u.ST_NO_SUCH_ACTION, None
            return status, None

        return self._guard(f"N-ACTION {action}", event, run)

    def on_n_get(self, event):
        uid = str(event.request.RequestedSOPInstanceUID or "")

        def run():
            if self.ups is None:
                return ST_NO_SUCH_SOP_CLASS, None
            tags = event.request.AttributeIdentifierList or []
            tags = [tags] if isinstance(tags, int) else list(tags)  # one tag arrives as a bare tag
            return 0x0000, self.ups.get(uid, tags)

        return self._guard("N-GET", event, run)

    def on_c_find(self, event):
        if self.ups is None:
            yield ST_C_FIND_UNABLE, None
            return
        try:
            matches = self.ups.find(event.identifier)
        except Exception:
            log.exception("UPS C-FIND from %s failed", _calling(event))
            yield ST_C_FIND_UNABLE, None
            return
        for ds in matches:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield 0xFF00, ds
