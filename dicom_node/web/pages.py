"""Data for the HTML pages, and key-frame thumbnails.

Queries go straight to the journal's tables with LIMIT/OFFSET and one
grouped outbox query per page, so the studies page costs the same with
1,000 or 100,000 studies in the journal.  Thumbnails are rendered from the
spooled run with ``inference.frames.read_frame`` — the display pipeline the
selector sees (modality LUT, VOI/window, MONOCHROME1, shutters) — so the
picture on the page is the frame the model judged; lesion marks are drawn
where the SR says the lesion model saw them.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict, defaultdict
from datetime import datetime, timezone
from typing import Optional

import numpy as np
import sqlalchemy as sa

from dicom_node.journal import STUDY_STATES
from dicom_node.tables import OutboxRow, OutboxState, Study, aware as _aware

THUMB_SIZE = 320


def study_rows(journal, state: Optional[str], page: int, page_size: int) -> tuple[list[dict], int, dict]:
    """One page of studies (newest first), the number matching, and the count per state."""
    with journal.sessionmaker() as s:
        counts = dict(s.execute(sa.select(Study.state, sa.func.count()).group_by(Study.state)).all())
        q = sa.select(Study)
        if state:
            q = q.where(Study.state == state)
        total = counts.get(state, 0) if state else sum(counts.values())
        rows = s.scalars(q.order_by(Study.first_received.desc()).limit(page_size).offset(page * page_size)).all()
        uids = [r.study_uid for r in rows]
        delivery: dict[str, dict[str, dict[str, int]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(int)))
        if uids:
            for uid, dest, st, n in s.execute(
                    sa.select(OutboxRow.study_uid, OutboxRow.destination, OutboxRow.state, sa.func.count())
                    .where(OutboxRow.study_uid.in_(uids)).group_by(OutboxRow.study_uid, OutboxRow.destination,
                                                                   OutboxRow.state)).all():
                delivery[uid][dest][st] += n
        out = []
        for r in rows:
            d = {"study_uid": r.study_uid, "state": r.state, "stage": r.stage, "error": r.error,
                 "n_instances": r.n_instances, "first_received": _aware(r.first_received),
                 "last_received": _aware(r.last_received), "completed_at": _aware(r.completed_at),
                 "timings": dict(r.timings or {}),
                 "delivery": {dest: _delivery_summary(sts) for dest, sts in sorted(delivery[r.study_uid].items())}}
            out.append(d)
    return out, total, {k: counts.get(k, 0) for k in STUDY_STATES}


def _delivery_summary(states: dict[str, int]) -> str:
    live = {k: v for k, v in states.items() if k != OutboxState.SUPERSEDED}
    n = sum(live.values())
    if not n:
        return "superseded"
    if live.get("sent", 0) == n:
        return f"sent {n}/{n}"
    if live.get("failed"):
        return f"failed {live['failed']}/{n}"
    return f"pending {live.get('pending', 0) + live.get('sending', 0)}/{n}"


def outbox_history(journal, study_uid: str) -> list[dict]:
    with journal.sessionmaker() as s:
        return [dict(sop_instance_uid=r.sop_instance_uid, kind=_kind(r.path), destination=r.destination,
                     state=r.state, attempts=r.attempts, last_status=r.last_status, last_error=r.last_error,
                     created_at=r.created_at, last_attempt_at=r.last_attempt_at, sent_at=r.sent_at)
                for r in s.scalars(sa.select(OutboxRow).where(OutboxRow.study_uid == study_uid)
                                   .order_by(OutboxRow.id))]


def _kind(path: str) -> str:
    name = str(path).rsplit("/", 1)[-1]
    return name.split("_", 1)[0] if "_" in name else "?"


def study_jobs(journal, study_uid: str) -> list:
    return journal.jobs(study_uid=study_uid)


def series_groups(instances) -> list[dict]:
    groups: "OrderedDict[str, dict]" = OrderedDict()
    for i in instances:
        g = groups.setdefault(i.series_uid, {"series_uid": i.series_uid, "modality": i.modality, "instances": []})
        g["instances"].append(i)
    return list(groups.values())


def ago(t: Optional[datetime]) -> str:
    if t is None:
        return ""
    t = t if t.tzinfo else t.replace(tzinfo=timezone.utc)
    s = (datetime.now(timezone.utc) - t).total_seconds()
    if s < 90:
        return f"{s:.0f} s ago"
    if s < 5400:
        return f"{s / 60:.0f} min ago"
    if s < 129600:
        return f"{s / 3600:.0f} h ago"
    return f"{s / 86400:.0f} d ago"


# -- thumbnails -----------------------------------------------------------------
class ThumbnailCache:
    """A small LRU of rendered PNGs (a page shows the same few frames on every refresh)."""

    def __init__(self, capacity: int = 128):
        self.capacity = capacity
        self._d: "OrderedDict[tuple, bytes]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, make):
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return self._d[key]
        png = make()
        with self._lock:
            self._d[key] = png
            while len(self._d) > self.capacity:
                self._d.popitem(last=False)
        return png


def render_thumbnail(path: str, frame_number: int, marks: list[tuple[float, float, str]],
                     size: int = THUMB_SIZE) -> bytes:
    """The display frame as a PNG at most ``size`` pixels wide, with lesion marks (x, y in frame pixels)."""
    from PIL import Image, ImageDraw

    from inference.frames import read_frame

    frame = read_frame(path, frame_number)
    img = Image.fromarray((np.clip(frame, 0, 1) * 255 + 0.5).astype(np.uint8), mode="L").convert("RGB")
    h, w = frame.shape[:2]
    scale = min(1.0, size / max(h, w)) if max(h, w) > size else size / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    if marks:
        draw = ImageDraw.Draw(img)
        r = max(6, round(nw / 24))
        for x, y, label in marks:
            cx, cy = x * scale, y * scale
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(255, 200, 0), width=2)
            draw.text((cx + r + 2, cy - r), label, fill=(255, 200, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
