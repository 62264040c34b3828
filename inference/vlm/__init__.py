"""Report generation: key frames -> bilingual draft report (findings / impression / recommendation).

``load_backend(vlm_cfg, bundle) -> ReportBackend``; ``ReportBackend.generate(images, language)``;
``report_study(backend, images_by_side | runs, frames_for=None, languages=("en", "ja"), concepts=None)``
(``concepts``: the lesion model's findings, given to a model trained with them:
``backend.uses_concepts``, from the bundle manifest's ``vlm.training.concepts``).
The transformers backend (torch) is imported lazily, only when selected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from inference.types import ModelInfo
from inference.vlm.base import (
    HEADERS,
    PROMPTS,
    ReportBackend,
    ReportError,
    ReportTimeout,
    build_prompt,
    concepts_line,
    format_report,
    normalise_concepts,
    parse_report,
    report_study,
    select_images,
)

__all__ = [
    "HEADERS", "PROMPTS", "ReportBackend", "ReportError", "ReportTimeout", "build_prompt",
    "concepts_line", "format_report", "load_backend", "normalise_concepts", "parse_report", "report_study",
    "select_images", "trained_with_concepts", "register_backend", "backend_names",
]


def _get(cfg: Any, key: str, default=None):
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _concepts_on(value: Any) -> bool:
    """A ``concepts`` setting (config or manifest) that turns concepts on: set and not "none"."""
    return bool(value) and str(value).lower() != "none"


def trained_with_concepts(training: Optional[dict]) -> bool:
    """Whether a manifest's ``vlm.training`` says the model learnt to read the lesion model's
    findings in its prompt (``"concepts": "findings"``; absent or ``"none"``: it did not)."""
    return _concepts_on((training or {}).get("concepts"))


#: name -> factory(vlm_cfg, bundle, model_info, common) -> ReportBackend; ``common`` holds
#: max_new_tokens, max_images, timeout_s.  ``vlm.backend`` in the config selects one by name.
_BACKENDS: dict[str, Callable[..., ReportBackend]] = {}


def register_backend(name: str):
    """Decorator: make a backend factory selectable as ``vlm.backend: <name>`` (as timm's
    ``register_model``).  A name registered twice is an error."""

    def deco(factory: Callable[..., ReportBackend]) -> Callable[..., ReportBackend]:
        if name in _BACKENDS or name == "none":
            raise ValueError(f"VLM backend {name!r} is already registered")
        _BACKENDS[name] = factory
        return factory

    return deco


def backend_names() -> list[str]:
    """The registered backend names (``none`` turns the VLM off and is not one)."""
    return sorted(_BACKENDS)


def load_backend(vlm_cfg: Any, bundle=None) -> ReportBackend:
    """The backend ``vlm_cfg`` (``dicom_node.config.VLMConfig`` or a dict) names in ``backend``.

    ``bundle`` = transformers on ``bundle.vlm_path`` (+ the bundle's adapter); ``transformers`` =
    ``vlm.path`` (+ ``vlm.adapter``) or the bundle's; ``openai`` = ``vlm.url``; others as
    registered with :func:`register_backend`.  ``backend.uses_concepts`` (give the model the lesion
    model's findings) comes from the config's ``concepts`` when set, else from the bundle manifest
    when the bundle's VLM is used.
    """
    kind = _get(vlm_cfg, "backend", "bundle") or "bundle"
    if kind == "none":
        raise ReportError("vlm.backend is 'none': report generation is disabled")
    factory = _BACKENDS.get(kind)
    if factory is None:
        raise ReportError(f"vlm.backend: unknown backend {kind!r} (one of {', '.join(backend_names())}, none)")
    common = dict(max_new_tokens=int(_get(vlm_cfg, "max_new_tokens", 256) or 256),
                  max_images=int(_get(vlm_cfg, "max_images", 4) or 4),
                  timeout_s=float(_get(vlm_cfg, "timeout_s", 120.0) or 120.0))
    info: Optional[ModelInfo] = bundle.model_info() if bundle is not None else None
    return factory(vlm_cfg, bundle, info, common)


@register_backend("openai")
def _openai(vlm_cfg, bundle, info: Optional[ModelInfo], common: dict) -> ReportBackend:
    from inference.vlm.openai_backend import OpenAIBackend

    model = _get(vlm_cfg, "model")
    if info is not None:
        info = ModelInfo(**{**info.to_dict(), "vlm": f"openai:{model}", "adapter": model or ""})
    backend = OpenAIBackend(url=_get(vlm_cfg, "url"), model=model, api_key_env=_get(vlm_cfg, "api_key_env"),
                            retries=int(_get(vlm_cfg, "retries", 3)), model_info=info,
                            max_concurrent=_get(vlm_cfg, "max_concurrent"), **common)
    backend.from_first_language = bool(_get(vlm_cfg, "from_first_language"))
    backend.uses_concepts = _concepts_on(_get(vlm_cfg, "concepts"))
    return backend


@register_backend("bundle")
@register_backend("transformers")
def _transformers(vlm_cfg, bundle, info: Optional[ModelInfo], common: dict) -> ReportBackend:
    kind = _get(vlm_cfg, "backend", "bundle") or "bundle"
    from_first = _get(vlm_cfg, "from_first_language")
    concepts = _get(vlm_cfg, "concepts")
    path = _get(vlm_cfg, "path") if kind == "transformers" else None
    adapter = _get(vlm_cfg, "adapter") if kind == "transformers" else None
    if path:
        # An explicit local model: the report names that path (and adapter), not the bundle's VLM.
        base = info.to_dict() if info else {"name": Path(str(path)).name, "version": "", "device_uid": ""}
        info = ModelInfo(**{**base, "vlm": str(path), "adapter": str(adapter or "")})
    else:
        if bundle is None or bundle.vlm_path is None:
            raise ReportError("no VLM: the bundle has no vlm section and vlm.path is not set")
        path = bundle.vlm_path
        adapter = adapter or bundle.adapter_path
        if bundle.manifest.vlm is not None:
            training = bundle.manifest.vlm.training or {}
            if from_first is None:
                from_first = training.get("from_first_language")
            if concepts is None:
                concepts = "findings" if trained_with_concepts(training) else None
    from inference.vlm.transformers_backend import TransformersBackend

    backend = TransformersBackend(path, adapter=adapter, device=_get(vlm_cfg, "device", "auto") or "auto",
                                  model_info=info, threads=_get(vlm_cfg, "threads"), **common)
    backend.from_first_language = bool(from_first)
    backend.uses_concepts = _concepts_on(concepts)
    return backend
