"""The one validated configuration of a node.

Every key has a default, so an empty file (or no file) is a working loopback
node.  Unknown keys and wrong types are rejected at start-up with a message that
names the key (``node.port: Input should be a valid integer``): a typo in a
hospital's config must never be silently ignored.

Relative paths in the file are resolved against the directory of the config
file, so ``cag-node serve --config /etc/cag-node/config.yaml`` works from any
working directory.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(ValueError):
    """Invalid configuration; the message names the offending key(s)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_ae(v: str) -> str:
    if not (1 <= len(v) <= 16) or "\\" in v or any(ord(c) < 32 for c in v) or v.strip() == "":
        raise ValueError("an AE title is 1-16 printable characters without backslash")
    return v


class TLSConfig(_Strict):
    """DICOM TLS.  ``ca`` set means client certificates are required and verified."""

    enabled: bool = False
    cert: Optional[str] = None
    key: Optional[str] = None
    ca: Optional[str] = None


class NodeConfig(_Strict):
    ae_title: str = "CAGNODE"
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=0, le=65535)
    max_pdu: int = Field(0, ge=0, description="0 = unlimited")
    allowed_calling_aets: list[str] = Field(default_factory=lambda: ["ORTHANC", "MODALITY"])
    allowed_hosts: list[str] = Field(default_factory=list)
    tls: TLSConfig = Field(default_factory=TLSConfig)
    acse_timeout: float = Field(30.0, gt=0)
    dimse_timeout: float = Field(60.0, gt=0)
    network_timeout: float = Field(60.0, gt=0)
    max_associations: int = Field(16, ge=1)
    # Several nodes on one journal (docs/scale-out.md): each needs its own id (default: the
    # host name).  A node's claims on jobs and sends are leases it renews every lease_s/3; a
    # dead node's are taken over by the others once lease_s has passed without a renewal.
    id: Optional[str] = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    lease_s: float = Field(60.0, ge=2.0)
    # Receiver processes on the one port (SO_REUSEPORT): "auto" = the number of CPU cores.  The
    # extra processes receive (spool, journal, completion, MPPS and UPS requests); jobs, sends,
    # the node's own work items, admin and web stay in the first.
    processes: Union[int, Literal["auto"]] = "auto"

    @field_validator("processes")
    @classmethod
    def _processes(cls, v):
        if v != "auto" and not (1 <= int(v) <= 64):
            raise ValueError("processes is 1-64 or 'auto'")
        return v

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae(v)

    @field_validator("allowed_calling_aets")
    @classmethod
    def _aets(cls, v: list[str]) -> list[str]:
        for a in v:
            if a != "*":
                _check_ae(a)
        return v

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        for h in v:
            try:
                ipaddress.ip_network(h, strict=False)
            except ValueError as exc:
                raise ValueError(f"{h!r} is not an IP address or CIDR network") from exc
        return v


class StorageConfig(_Strict):
    path: str = "./var/spool"
    journal: str = "sqlite:///./var/journal.db"
    min_free_mb: int = Field(1024, ge=0)
    fsync: bool = Field(True, description="fsync every instance before acknowledging it")


class CompletionConfig(_Strict):
    quiet_seconds: float = Field(30.0, ge=0)


class ModelsConfig(_Strict):
    bundle: str = "./models/demo"


class ProcessingConfig(_Strict):
    """What happens to a complete study (the pipeline stages: frames, selector, lesions, vlm, encode)."""

    enabled: bool = True
    workers: int = Field(1, ge=1, le=16)
    # Runs of these modalities are analysed; every other instance is stored and
    # recorded as "not processed" (a PACS forwarding a whole study sees no failure).
    modalities: list[str] = Field(default_factory=lambda: ["XA"])
    selector_timeout_s: float = Field(600.0, gt=0)
    vlm_timeout_s: float = Field(900.0, gt=0)
    encode_timeout_s: float = Field(120.0, gt=0)
    lesions_timeout_s: float = Field(300.0, gt=0)
    languages: list[Literal["en", "ja"]] = Field(default_factory=lambda: ["en", "ja"])
    send_kos: bool = True


class SelectorConfig(_Strict):
    threads: int = Field(2, ge=1)
    batch_size: int = Field(16, ge=1)
    min_gap: int = Field(5, ge=1, description="minimum distance between candidate frames")
    max_key_frames: int = Field(2, ge=1, description="key frames kept per run")
    providers: list[str] = Field(default_factory=lambda: ["auto"])


class LesionsConfig(_Strict):
    """The lesion model on the key frames (when the bundle has one)."""

    enabled: bool = True
    threads: int = Field(2, ge=1)
    providers: list[str] = Field(default_factory=lambda: ["auto"])
    # lesions below this confidence (heatmap peak probability) are left out of report and SR
    min_confidence: float = Field(0.0, ge=0.0, le=1.0)


class VLMConfig(_Strict):
    # a name registered with inference.vlm.register_backend (bundle, transformers, openai), or none
    backend: str = "bundle"
    path: Optional[str] = None  # local model dir overriding the bundle's
    adapter: Optional[str] = None  # local LoRA adapter dir
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_new_tokens: int = Field(256, ge=1)
    max_images: int = Field(4, ge=1)
    # torch threads for the in-process backend: 1 is ~10x faster than 2 for the
    # tiny demo model on a busy 2-core host (measured); raise it for real models.
    threads: Optional[int] = Field(1, ge=1)
    # Write the second language from the first language's draft so both say the same thing.
    # None: as the model was trained (the bundle manifest says; False for other models).
    from_first_language: Optional[bool] = None
    # openai-compatible server (vLLM)
    url: Optional[str] = None
    model: Optional[str] = None
    api_key_env: Optional[str] = None
    timeout_s: float = Field(120.0, gt=0)
    retries: int = Field(3, ge=0)
    # at most this many requests of one node process in flight (null: one per processing
    # worker); the nodes' limits summed should not exceed the server's --max-num-seqs
    max_concurrent: Optional[int] = Field(None, ge=1)

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        from inference.vlm import backend_names

        if v != "none" and v not in backend_names():
            raise ValueError(f"unknown VLM backend {v!r}: one of {', '.join(backend_names() + ['none'])}")
        return v


class Destination(_Strict):
    name: str
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: Optional[str] = None  # default: node.ae_title
    tls: TLSConfig = Field(default_factory=TLSConfig)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae(v)


class OutboxConfig(_Strict):
    retry_base_s: float = Field(5.0, gt=0)
    retry_max_s: float = Field(900.0, gt=0)
    horizon_s: float = Field(86400.0, gt=0, description="after this long a result is marked failed")
    poll_s: float = Field(2.0, gt=0)


class MPPSConfig(_Strict):
    """Modality Performed Procedure Step SCP (dicom_node.mpps): the modality says when it is done."""

    enabled: bool = True
    # After N-SET COMPLETED, wait this long for the listed instances; then the
    # quiet-period timer decides (logged, shown in `cag-node studies`).
    instance_timeout_s: float = Field(300.0, gt=0)
    # DISCONTINUED: "process" what arrived at once, or "skip" the study (state failed,
    # stage mpps; `cag-node retry` processes it anyway).
    on_discontinued: Literal["process", "skip"] = "process"
    # name of a destination (destinations:) every MPPS N-CREATE/N-SET is forwarded to
    forward_to: Optional[str] = None


class Subscriber(_Strict):
    """Where N-EVENT-REPORTs for a subscribed AE title are sent (a separate association)."""

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae(v)


class UPSConfig(_Strict):
    """Unified Procedure Step provider (IHE AIW-I; dicom_node.ups)."""

    enabled: bool = True
    # AE titles that may subscribe (N-ACTION subscribe) and where their event reports go;
    # an unknown Receiving AE is refused with 0xC308.
    subscribers: list[Subscriber] = Field(default_factory=list)
    # the node creates a UPS for every study it processes (claimed, completed with the SR/KOS)
    create_for_studies: bool = False
    event_timeout_s: float = Field(10.0, gt=0, description="per N-EVENT-REPORT association")


class AdminConfig(_Strict):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    allow_remote: bool = Field(False, description="required to bind the admin port off loopback")


class WebAuthConfig(_Strict):
    """Where the web face's one secret comes from (never the config file itself, never logged).

    Clients send it as ``Authorization: Bearer <token>`` (DICOMweb tools) or as
    the password of HTTP basic auth with user ``user`` (browsers).
    """

    token_file: Optional[str] = None  # a file holding the token (first line)
    token_env: Optional[str] = None  # or the name of an environment variable holding it
    user: str = "cag"  # the basic-auth user name


class WebTLSConfig(_Strict):
    cert: Optional[str] = None
    key: Optional[str] = None


class WebConfig(_Strict):
    """Status pages and DICOMweb (STOW-RS in, QIDO-RS / WADO-RS of results).

    Off by default so that an upgraded node opens no new port; when enabled it
    binds loopback unless ``allow_remote`` is set, which also requires TLS and
    authentication (checked in ``parse_config``).
    """

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(8081, ge=0, le=65535)
    allow_remote: bool = Field(False, description="required to bind off loopback (with tls and auth)")
    tls: WebTLSConfig = Field(default_factory=WebTLSConfig)
    auth: WebAuthConfig = Field(default_factory=WebAuthConfig)
    allowed_hosts: list[str] = Field(default_factory=list, description="optional client IP/CIDR allow-list")
    max_upload_mb: int = Field(2048, ge=1, description="largest STOW-RS request body")
    refresh_s: int = Field(10, ge=0, description="studies page auto-refresh; 0 = off")
    page_size: int = Field(200, ge=1, le=5000, description="studies per page")

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        return NodeConfig._hosts(v)


class LoggingConfig(_Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    file: Optional[str] = None


class Config(_Strict):
    node: NodeConfig = Field(default_factory=NodeConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    completion: CompletionConfig = Field(default_factory=CompletionConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    processing: ProcessingConfig = Field(default_factory=ProcessingConfig)
    selector: SelectorConfig = Field(default_factory=SelectorConfig)
    lesions: LesionsConfig = Field(default_factory=LesionsConfig)
    vlm: VLMConfig = Field(default_factory=VLMConfig)
    destinations: list[Destination] = Field(default_factory=list)
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    mpps: MPPSConfig = Field(default_factory=MPPSConfig)
    ups: UPSConfig = Field(default_factory=UPSConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    web: WebConfig = Field(default_factory=WebConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    # Directory relative paths are resolved against (not a config key).
    base_dir: Path = Field(default_factory=Path.cwd, exclude=True)

    def resolve(self, p: str | os.PathLike) -> Path:
        """Resolve a path from the config against the config file's directory."""
        path = Path(os.path.expanduser(str(p)))
        return path if path.is_absolute() else (self.base_dir / path)

    @property
    def spool_dir(self) -> Path:
        return self.resolve(self.storage.path)

    @property
    def bundle_dir(self) -> Path:
        return self.resolve(self.models.bundle)

    @property
    def node_id(self) -> str:
        """This node's id in the journal's claims (``node.id``, default the host name)."""
        return self.node.id or socket.gethostname()

    @property
    def receiver_processes(self) -> int:
        """How many processes receive on the port (``node.processes``)."""
        n = self.node.processes
        return max(1, os.cpu_count() or 1) if n == "auto" else int(n)

    @property
    def journal_url(self) -> str:
        """The journal URL with a relative sqlite path resolved against base_dir."""
        url = self.storage.journal
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith("sqlite:////"):
            rel = url[len(prefix):]
            if rel and rel != ":memory:":
                return prefix + str(self.resolve(rel))
        return url


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def parse_config(data: dict | None, base_dir: Path | None = None, source: str = "<dict>") -> Config:
    data = dict(data or {})
    if "base_dir" in data:
        raise ConfigError(f"invalid configuration in {source}:\n  base_dir: unknown key")
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None
    if base_dir is not None:
        cfg.base_dir = Path(base_dir).resolve()
    if cfg.node.tls.enabled and not (cfg.node.tls.cert and cfg.node.tls.key):
        raise ConfigError(f"invalid configuration in {source}:\n  node.tls: enabled needs cert and key")
    if not cfg.admin.allow_remote and cfg.admin.enabled:
        try:
            if not ipaddress.ip_address(cfg.admin.host).is_loopback:
                raise ConfigError(
                    f"invalid configuration in {source}:\n  admin.host: {cfg.admin.host} is not a loopback "
                    "address; set admin.allow_remote: true to expose /metrics off this machine"
                )
        except ValueError:
            if cfg.admin.host != "localhost":
                raise ConfigError(
                    f"invalid configuration in {source}:\n  admin.host: must be a loopback IP address"
                ) from None
    _check_web(cfg, source)
    names = [d.name for d in cfg.destinations]
    if len(set(names)) != len(names):
        raise ConfigError(f"invalid configuration in {source}:\n  destinations: names must be unique")
    if cfg.mpps.forward_to is not None and cfg.mpps.forward_to not in names:
        raise ConfigError(f"invalid configuration in {source}:\n  mpps.forward_to: no destination named "
                          f"{cfg.mpps.forward_to!r}")
    return cfg


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_web(cfg: Config, source: str) -> None:
    """Off loopback the web face needs allow_remote, TLS and a token source (PHI crosses the wire)."""
    w = cfg.web
    head = f"invalid configuration in {source}:\n"
    if bool(w.tls.cert) != bool(w.tls.key):
        raise ConfigError(head + "  web.tls: cert and key go together")
    if w.auth.token_file and w.auth.token_env:
        raise ConfigError(head + "  web.auth: set token_file or token_env, not both")
    if not w.enabled or _is_loopback(w.host):
        return
    if not w.allow_remote:
        raise ConfigError(head + f"  web.host: {w.host} is not a loopback address; set web.allow_remote: true "
                          "(with web.tls and web.auth) to serve the web face off this machine")
    if not (w.tls.cert and w.tls.key):
        raise ConfigError(head + "  web.tls: serving off loopback needs cert and key")
    if not (w.auth.token_file or w.auth.token_env):
        raise ConfigError(head + "  web.auth: serving off loopback needs token_file or token_env")


def load_config(path: str | os.PathLike | None) -> Config:
    """Load and validate a YAML config; ``None`` or a missing default file gives the defaults."""
    if path is None:
        default = Path("config.yaml")
        if not default.exists():
            return parse_config({}, base_dir=Path.cwd(), source="(defaults)")
        path = default
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"configuration file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid configuration in {p}: not valid YAML: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"invalid configuration in {p}: the top level must be a mapping")
    return parse_config(data, base_dir=p.resolve().parent, source=str(p))
