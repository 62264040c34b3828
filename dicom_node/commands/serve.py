"""``cag-node serve``: run the node in the foreground until SIGTERM/SIGINT.

Prints one ready line on stdout once the listener is bound (tests and
supervisors wait for it), e.g.
``cag-node listening on 127.0.0.1:11112 as CAGNODE (admin 127.0.0.1:8080)``.
Shutdown is graceful: no new associations, in-flight C-STOREs finish,
processing jobs stay journaled and resume at the next start; exit 0.
"""

from __future__ import annotations

import signal
import sys

from dicom_node.config import load_config


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the DICOM node until SIGTERM/SIGINT")
    p.add_argument("--config", help="config.yaml (default: ./config.yaml or built-in defaults)")
    p.add_argument("--bundle", help="model bundle directory (overrides models.bundle)")
    p.add_argument("--grace", type=float, default=30.0, help="seconds to let in-flight associations finish")
    p.set_defaults(func=run)


def run(args) -> int:
    from dicom_node.logging_setup import setup_logging
    from dicom_node.node import Node

    cfg = load_config(args.config)
    setup_logging(cfg, verbose=getattr(args, "verbose", False))
    node = Node(cfg, bundle_dir=args.bundle)

    def _signal(signum, _frame):
        node.request_stop()

    signal.signal(signal.SIGTERM, _signal)
    signal.signal(signal.SIGINT, _signal)
    try:
        node.start()
    except OSError as exc:  # port taken, no permission, certificate unreadable, ...
        print(f"cag-node serve: cannot start: {exc}", file=sys.stderr)
        return 1
    try:
        host, port = node.address
        admin = f"admin {cfg.admin.host}:{node.admin_port}" if node.admin_port is not None else "admin disabled"
        tls = " with TLS" if cfg.node.tls.enabled else ""
        web = f"; web {node.web.url}" if node.web is not None else ""
        print(f"cag-node listening on {host}:{port} as {cfg.node.ae_title}{tls} ({admin}){web}", flush=True)
        node.run_forever()
    finally:
        node.stop(grace_s=args.grace)
    sys.stdout.flush()
    return 0
