"""The node's web face: status pages for people and DICOMweb for machines.

``server.WebServer`` runs a Starlette app (``app.build_app``) under uvicorn in
a thread of the node process, so STOW-RS writes through the very same
``StorageSCP.store`` as C-STORE and the pages read the live journal.
Modules: ``multipart`` (multipart/related), ``auth`` (token, CSRF, client
allow-list, PHI-free access log), ``stow``, ``dicomweb`` (QIDO-RS, WADO-RS),
``results`` (what an SR says), ``pages`` (HTML).
"""
