"""The Starlette application: pages, actions, DICOMweb.

Built around a running :class:`dicom_node.node.Node` (its journal, spool,
listener and outbox), so STOW-RS and the actions share the node's state
instead of opening a second one.  Handlers that touch the disk or the
journal are plain functions, which Starlette runs in its thread pool; the
event loop only moves bytes.
"""

from __future__ import annotations

import logging
import secrets
import time
import urllib.parse
from pathlib import Path
from typing import Optional

import sqlalchemy as sa
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

import dicom_node
from dicom_node.journal import STUDY_STATES
from dicom_node.tables import OutboxRow, OutboxState, StudyState
from dicom_node.spool import RESULTS_DIR, uid_is_path_safe
from dicom_node.web import auth, dicomweb, pages, stow
from dicom_node.web.results import read_report, result_files

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
FLASH = {
    "retried": "Processing re-queued.",
    "resent": "Results re-queued for sending.",
    "resent-none": "Nothing to re-send (no destination configured, or no result yet).",
    "refused": "Not possible now: the study is unknown or still receiving.",
    "csrf": "The form expired; reload the page and try again.",
}


class DicomJSON(JSONResponse):
    media_type = dicomweb.DICOM_JSON


def _error(status: int, message: str) -> PlainTextResponse:
    return PlainTextResponse(message.rstrip("\n") + "\n", status_code=status)


def build_app(node, token: Optional[str] = None) -> Starlette:
    cfg = node.config
    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html"]))
    env.filters["ago"] = pages.ago
    env.filters["ts"] = lambda t: t.strftime("%Y-%m-%d %H:%M:%S") if t else ""
    thumbs = pages.ThumbnailCache()
    results_root = Path(cfg.spool_dir) / RESULTS_DIR
    secure_cookie = bool(cfg.web.tls.cert)

    def base_url(request: Request) -> str:
        """scheme://host:port of this server, for RetrieveURLs.  Some clients (dicomweb-client)
        send a Host header without the port; the port we listen on is added then."""
        scheme = request.url.scheme
        host = request.headers.get("host") or request.url.hostname or "127.0.0.1"
        if ":" not in host.rsplit("]", 1)[-1]:
            port = (request.scope.get("server") or (None, None))[1]
            if port and port != {"http": 80, "https": 443}.get(scheme):
                host = f"{host}:{port}"
        return f"{scheme}://{host}"

    def render(request: Request, name: str, status: int = 200, **ctx) -> HTMLResponse:
        tok = request.cookies.get(auth.CSRF_COOKIE) or auth.new_csrf_token()
        ctx.update(csrf=tok, ae_title=cfg.node.ae_title, version=dicom_node.__version__,
                   flash=FLASH.get(request.query_params.get("done", "")))
        resp = HTMLResponse(env.get_template(name).render(**ctx), status_code=status)
        if request.cookies.get(auth.CSRF_COOKIE) != tok:
            resp.set_cookie(auth.CSRF_COOKIE, tok, httponly=True, samesite="strict", secure=secure_cookie,
                            path="/")
        return resp

    def valid_uid(uid: str) -> bool:
        return uid_is_path_safe(uid) and len(uid) <= 64

    # -- pages ------------------------------------------------------------------
    def index(request: Request):
        return RedirectResponse("/studies", status_code=303)

    def studies(request: Request):
        state = request.query_params.get("state") or None
        if state is not None and state not in STUDY_STATES:
            return _error(400, f"unknown state {state[:32]!r}; one of {', '.join(STUDY_STATES)}")
        try:
            page = max(0, int(request.query_params.get("page", "0")))
        except ValueError:
            return _error(400, "page must be an integer")
        rows, total, counts = pages.study_rows(node.journal, state, page, cfg.web.page_size)
        return render(request, "studies.html", studies=rows, total=total, counts=counts, state=state, page=page,
                      page_size=cfg.web.page_size, refresh_s=cfg.web.refresh_s, states=STUDY_STATES,
                      destinations=[d.name for d in cfg.destinations])

    def study(request: Request):
        uid = request.path_params["study_uid"]
        st = node.journal.get_study(uid) if valid_uid(uid) else None
        if st is None:
            return render(request, "error.html", status=404, message="No such study in the journal.")
        instances = node.journal.study_instances(uid)
        files = result_files(results_root / uid)
        srs = [f for f in files if f.kind == "SR"]
        report, report_error = None, None
        if srs:
            try:
                report = read_report(srs[0])
            except Exception as exc:  # shown, not raised: the page is for finding out what is wrong
                report_error = f"{exc.__class__.__name__}: {exc}"
        return render(request, "study.html", study=st, series=pages.series_groups(instances), files=files,
                      report=report, report_error=report_error, jobs=pages.study_jobs(node.journal, uid),
                      history=pages.outbox_history(node.journal, uid), refresh_s=cfg.web.refresh_s
                      if st.state in (StudyState.RECEIVING, StudyState.WAITING, StudyState.PROCESSING, StudyState.REPORTED) else 0,
                      has_destinations=bool(cfg.destinations))

    def frame_png(request: Request):
        uid, sop = request.path_params["study_uid"], request.path_params["sop_uid"]
        n = request.path_params["frame"]
        inst = node.journal.get_instance(sop) if valid_uid(sop) and valid_uid(uid) else None
        if inst is None or inst.study_uid != uid:
            return _error(404, "no such instance in this study")
        if not 1 <= n <= (inst.n_frames or 1):
            return _error(404, f"frame {n} is outside 1..{inst.n_frames or 1}")
        marks = []
        if request.query_params.get("marks", "1") != "0":
            srs = [f for f in result_files(results_root / uid) if f.kind == "SR"]
            if srs:
                try:
                    rep = read_report(srs[0])
                    marks = [(l.x, l.y, l.name.replace("Lesion ", "L")) for l in rep.lesions
                             if l.sop_instance_uid == sop and l.frame_number == n and l.x is not None]
                except Exception:
                    marks = []
        key = (inst.path, inst.size, n, tuple(marks))
        try:
            png = thumbs.get(key, lambda: pages.render_thumbnail(inst.path, n, marks))
        except Exception as exc:
            return _error(422, f"frame cannot be rendered: {exc.__class__.__name__}")
        return Response(png, media_type="image/png")

    def health_page(request: Request):
        h = node.health()
        bundle, bundle_error = None, None
        try:
            b = node.bundle
            m = b.manifest
            bundle = {"root": str(b.root), "name": m.name, "version": m.version, "synthetic_demo": m.synthetic_demo,
                      "device_uid": b.device_uid, "created": m.created,
                      "parts": [(what, getattr(spec, "file", None) or getattr(spec, "path", None), spec.sha256)
                                for what, spec in (("selector", m.selector), ("lesion model", m.lesions),
                                                   ("VLM", m.vlm)) if spec is not None]}
        except Exception as exc:
            bundle_error = f"{exc.__class__.__name__}: {exc}"
        with node.journal.sessionmaker() as s:
            from dicom_node.tables import Rejection, Study

            counts = dict(s.execute(sa.select(Study.state, sa.func.count()).group_by(Study.state)).all())
            n_rej = s.scalar(sa.select(sa.func.count()).select_from(Rejection)) or 0
        outbox = node.outbox.counts() if node.outbox is not None else {}
        if request.url.path.endswith(".json"):
            return JSONResponse({"health": h, "version": dicom_node.__version__, "bundle": bundle,
                                 "bundle_error": bundle_error, "studies": counts, "outbox": outbox,
                                 "rejections": n_rej})
        return render(request, "health.html", health=h, bundle=bundle, bundle_error=bundle_error, counts=counts,
                      outbox=outbox, rejections=n_rej, cfg=cfg, web_address=node.web.address if node.web else None)

    # -- actions ----------------------------------------------------------------
    async def action(request: Request):
        uid = request.path_params["study_uid"]
        what = request.path_params["action"]
        if what not in ("retry", "resend"):
            return _error(404, "no such action")
        origin = request.headers.get("origin")
        if origin and origin != "null" and urllib.parse.urlsplit(origin).netloc != request.headers.get("host"):
            return _error(403, "cross-origin form submission refused")
        if origin == "null":
            return _error(403, "cross-origin form submission refused")
        body = await request.body()
        if len(body) > 4096:
            return _error(413, "form too large")
        form = urllib.parse.parse_qs(body.decode("latin-1"))
        if not auth.csrf_ok(request.cookies.get(auth.CSRF_COOKIE), (form.get(auth.CSRF_FIELD) or [""])[0]):
            return _error(403, "missing or wrong CSRF token: reload the page and submit the form again")
        if not valid_uid(uid):
            return _error(404, "no such study")
        done = await run_in_threadpool(_do_action, what, uid)
        return RedirectResponse(f"/studies/{uid}?done={done}", status_code=303)

    def _do_action(what: str, uid: str) -> str:
        from dicom_node.commands.retry import RetryRefused, requeue

        if what == "retry":
            try:
                msg = requeue(node.journal, uid)
            except RetryRefused:
                return "refused"
            log.info("web: %s", msg)
            node._wake.set()  # a worker takes it now rather than at its next poll
            return "retried"
        st = node.journal.get_study(uid)
        if st is None or st.state == StudyState.RECEIVING:
            return "refused"
        from dicom_node.outbox import requeue_current, resend_study_db

        with node.journal.sessionmaker() as s:
            n_rows = s.scalar(sa.select(sa.func.count()).select_from(OutboxRow)
                              .where(OutboxRow.study_uid == uid, OutboxRow.state != OutboxState.SUPERSEDED)) or 0
        if not n_rows:
            return "resent-none"
        # failed/sent: back to reported with the rows in one commit; otherwise only the rows
        n = node.journal.resume_delivery(uid, lambda s: requeue_current(s, uid),
                                         from_states=(StudyState.FAILED, StudyState.SENT))
        if n is None:
            n = resend_study_db(node.journal.sessionmaker, uid)
        log.info("web: study %s: %d result(s) re-queued for sending", uid, n)
        return "resent"

    # -- DICOMweb -------------------------------------------------------------------
    async def stow_rs(request: Request):
        target = request.path_params.get("study_uid")
        if target is not None and not valid_uid(target):
            return _error(400, "the Study Instance UID in the URL is not a valid UID")
        limit = cfg.web.max_upload_mb * 1024 * 1024
        clen = request.headers.get("content-length")
        if clen is not None:
            try:
                if int(clen) > limit:
                    return _error(413, f"request body larger than web.max_upload_mb={cfg.web.max_upload_mb}")
            except ValueError:
                return _error(400, "bad Content-Length")
        ctype = request.headers.get("content-type", "")
        try:
            stow.check_content_type(ctype)  # refuse before reading the body
        except stow.BadRequest as exc:
            return _error(exc.status, str(exc))
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return _error(413, f"request body larger than web.max_upload_mb={cfg.web.max_upload_mb}")
            chunks.append(chunk)
        body = b"".join(chunks)
        del chunks
        t0 = time.perf_counter()
        try:
            outcomes = await run_in_threadpool(stow.store_body, node.scp, body, ctype, target)
        except stow.BadRequest as exc:
            return _error(exc.status, str(exc))
        base = base_url(request)
        status, ds = stow.response_dataset(outcomes, base, lambda o: None)
        if target is not None:
            ds["00081190"] = {"vr": "UR", "Value": [f"{base}/dicomweb/studies/{target}"]}
        n_ok = sum(o.stored for o in outcomes)
        log.info("STOW-RS: %d of %d instance(s) stored, %.1f MB in %.2fs", n_ok, len(outcomes), size / 1e6,
                 time.perf_counter() - t0)
        headers = {}
        bad = [o.reason for o in outcomes if not o.stored and o.reason]
        if bad:
            headers["Warning"] = '299 cag-node "' + bad[0].replace('"', "'")[:200] + '"'
        return DicomJSON(ds, status_code=status, headers=headers)

    def qido_studies(request: Request):
        q = request.query_params
        try:
            studies_ = [s for s in node.journal.list_studies()
                        if dicomweb.match(q, "0020000D", "StudyInstanceUID", s.study_uid)]
            want = q.get("ModalitiesInStudy") or q.get("00080061")
            if not want:  # page before reading each study's holdings (cost ~ the page, not the journal)
                studies_ = dicomweb.paged(studies_, q)
            out = []
            for s in studies_:
                h = dicomweb.Holdings(node.journal, results_root, s.study_uid)
                mods = {x["modality"] for x in h.series.values()}
                if want and not ({w.strip() for w in want.split(",")} & mods):
                    continue
                out.append(dicomweb.study_json(s, h, base_url(request)))
            if want:
                out = dicomweb.paged(out, q)
        except ValueError as exc:
            return _error(400, str(exc))
        return DicomJSON(out) if out else Response(status_code=204)

    def _holdings(request: Request):
        uid = request.path_params["study_uid"]
        if not valid_uid(uid) or node.journal.get_study(uid) is None:
            return None
        return dicomweb.Holdings(node.journal, results_root, uid)

    def _qido_answer(q, matches) -> Response:
        """``matches()``: the matching objects (ValueError: a bad query); paged, 204 when none."""
        try:
            out = dicomweb.paged(matches(), q)
        except ValueError as exc:
            return _error(400, str(exc))
        return DicomJSON(out) if out else Response(status_code=204)

    def qido_series(request: Request):
        h = _holdings(request)
        if h is None:
            return _error(404, "no such study")
        q = request.query_params
        return _qido_answer(q, lambda: [
            dicomweb.series_json(h.study_uid, su, s, base_url(request)) for su, s in h.series.items()
            if dicomweb.match(q, "0020000E", "SeriesInstanceUID", su)
            and dicomweb.match(q, "00080060", "Modality", s["modality"])])

    def qido_instances(request: Request):
        h = _holdings(request)
        if h is None:
            return _error(404, "no such study")
        series_uid = request.path_params.get("series_uid")
        if series_uid is not None and series_uid not in h.series:
            return _error(404, "no such series in this study")
        q = request.query_params
        return _qido_answer(q, lambda: [
            dicomweb.instance_json(h.study_uid, su, i, base_url(request))
            for su, s in h.series.items() if series_uid in (None, su)
            for i in s["instances"]
            if dicomweb.match(q, "00080018", "SOPInstanceUID", i["sop_instance_uid"])
            and dicomweb.match(q, "00080016", "SOPClassUID", i["sop_class_uid"])])

    def wado(request: Request):
        accept = request.headers.get("accept", "*/*")
        if not any(a in accept for a in ("multipart/related", "*/*", "application/dicom")):
            return _error(406, 'only multipart/related; type="application/dicom" is served')
        h = _holdings(request)
        if h is None:
            return _error(404, "no such study")
        series_uid = request.path_params.get("series_uid")
        sop_uid = request.path_params.get("sop_uid")
        files = [r for r in h.results if series_uid in (None, r.series_uid) and sop_uid in (None, r.sop_instance_uid)]
        if not files:
            held = any(i["sop_instance_uid"] == sop_uid for s in h.series.values() for i in s["instances"]) \
                if sop_uid else (series_uid in h.series if series_uid else False)
            if held:
                return _error(404, "only the node's results (SR, KOS) are retrievable; received images are "
                                   "retrieved from the PACS")
            return _error(404, "no result of the node matches")
        body, ctype = dicomweb.multipart_files([r.path for r in files])
        return Response(body, media_type=None, headers={"content-type": ctype})

    routes = [
        Route("/", index),
        Route("/studies", studies),
        Route("/studies/{study_uid}", study),
        Route("/studies/{study_uid}/frames/{sop_uid}/{frame:int}.png", frame_png),
        Route("/studies/{study_uid}/{action}", action, methods=["POST"]),
        Route("/health", health_page),
        Route("/health.json", health_page),
        Route("/dicomweb/studies", stow_rs, methods=["POST"]),
        Route("/dicomweb/studies/{study_uid}", stow_rs, methods=["POST"]),
        Route("/dicomweb/studies", qido_studies, methods=["GET"]),
        Route("/dicomweb/studies/{study_uid}/series", qido_series, methods=["GET"]),
        Route("/dicomweb/studies/{study_uid}/instances", qido_instances, methods=["GET"]),
        Route("/dicomweb/studies/{study_uid}/series/{series_uid}/instances", qido_instances, methods=["GET"]),
        Route("/dicomweb/studies/{study_uid}", wado, methods=["GET"]),
        Route("/dicomweb/studies/{study_uid}/series/{series_uid}", wado, methods=["GET"]),
        Route("/dicomweb/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}", wado, methods=["GET"]),
    ]
    app = Starlette(routes=routes)
    return auth.GuardMiddleware(app, token=token, user=cfg.web.auth.user, allowed_hosts=cfg.web.allowed_hosts,
                                tls=bool(cfg.web.tls.cert))
