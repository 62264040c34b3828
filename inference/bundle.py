"""Model bundles: one folder holding everything a node runs, described by a manifest.

Layout::

    BUNDLE/
      manifest.json          # this module's Manifest
      selector.onnx          # the ConvNeXt selector (ONNX, dynamic batch axis)
      vlm/                   # a transformers model dir (save_pretrained + processor/tokenizer)
      vlm/adapter/           # optional LoRA adapter (peft), when not merged
      lesions.onnx           # optional lesion model (vessel / segment / stenosis maps)

The manifest is loaded and checked at start-up: files exist, SHA-256 hashes
match, class names are the six the node understands.  The Device UID (IHE AI
Results) is derived from the hashes, so it changes whenever a model changes and
stays stable otherwise.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from inference.types import CLASS_NAMES, ModelInfo

MANIFEST = "manifest.json"
_UID_ROOT = "2.25."  # UUID-derived UIDs (PS3.5 B.2)


class BundleError(RuntimeError):
    """The bundle is missing, incomplete or does not match its manifest."""


class Preprocessing(BaseModel):
    """How a frame becomes model input; training and serving both read this.  Strict: a key
    this code does not know is a step it would not apply, so the bundle is refused."""

    model_config = ConfigDict(extra="forbid")
    input_size: int = 224
    channels: int = 1  # grayscale; replicated if the model wants 3
    mean: float = 0.5
    std: float = 0.25
    # frame normalisation before mean/std (inference.frames.NORMALIZATIONS): "flatfield" takes
    # out brightness, gamma, large shadows and the collimated field, which differ between
    # cath labs and between synthetic and real runs; "none" for bundles made before it existed
    normalize: Literal["none", "flatfield"] = "none"


class _ModelPart(BaseModel):
    """What every model of a bundle records: its checksum, version, how it was trained, how it
    measured.  Strict (an unknown key is refused with its name); ``training`` and ``metrics`` are
    free-form."""

    model_config = ConfigDict(extra="forbid")
    sha256: Optional[str] = None
    version: str = "0"
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)


class SelectorSpec(_ModelPart):
    file: str = "selector.onnx"
    # what the exporter records about the ONNX graph (training/selector/export.py)
    input_name: str = "input"
    output: str = "logits"
    opset: Optional[int] = None
    precision: str = "fp32"
    quantization: Optional[Any] = None
    parity: dict[str, Any] = Field(default_factory=dict)
    arch: str = "convnext_atto"
    classes: list[str] = Field(default_factory=lambda: list(CLASS_NAMES))
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)


class VLMSpec(_ModelPart):
    path: str = "vlm"
    family: str = "gemma3"  # gemma3 | paligemma
    adapter: Optional[str] = None  # relative dir of a LoRA adapter, if not merged
    image_size: int = 112  # (sha256: over the weight files)
    prompt_style: str = "sections"


class LesionSpec(_ModelPart):
    """The lesion model: a fully convolutional network whose one output ``maps`` (N, C, S, S)
    holds the dense heads named in ``heads`` (name, channels), in order."""

    file: str = "lesions.onnx"
    arch: str = "unet_tiny"
    heads: list[tuple[str, int]] = Field(
        default_factory=lambda: [("vessel", 1), ("segment", 17), ("heatmap", 1), ("severity", 1)])
    preprocessing: Preprocessing = Field(default_factory=lambda: Preprocessing(input_size=256, normalize="flatfield"))
    # post-processing: a lesion is a heatmap peak >= peak_threshold, peaks at least
    # min_distance (model pixels) apart; vessel pixels are those with P(vessel) >= vessel_threshold
    peak_threshold: float = 0.3
    min_distance: int = 6
    vessel_threshold: float = 0.5
    # the input carries two frame-position channels after the image (inference.lesions.add_coords)
    coords: bool = False


class Manifest(BaseModel):
    """``manifest.json``: strict, like its sections (an unknown key is refused with its name)."""

    model_config = ConfigDict(extra="forbid")
    name: str = "cag-vlm"
    version: str = "0.1.0"
    created: str = ""
    synthetic_demo: bool = False
    description: str = ""
    selector: Optional[SelectorSpec] = None
    vlm: Optional[VLMSpec] = None
    lesions: Optional[LesionSpec] = None
    heldout_metrics: dict[str, Any] = Field(default_factory=dict)  # the demo build measures itself


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_dir(path: Path, suffixes: tuple[str, ...] = (".safetensors", ".bin", ".json", ".model")) -> str:
    """A hash over a model directory's weight/config files (sorted, path-qualified)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes):
        h.update(str(f.relative_to(path)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


class Bundle:
    """A loaded, verified bundle.  Cheap to construct; models are loaded by their runtimes."""

    def __init__(self, root: Path, manifest: Manifest):
        self.root = Path(root)
        self.manifest = manifest

    # -- paths --------------------------------------------------------------
    def _part_path(section: str, attr: str):  # noqa: N805  (a property factory used in the class body)
        def get(self) -> Optional[Path]:
            part = getattr(self.manifest, section)
            rel = getattr(part, attr) if part is not None else None
            return self.root / rel if rel else None

        return property(get, doc=f"The bundle's {section} ``{attr}`` as a path (None when absent).")

    selector_path = _part_path("selector", "file")
    vlm_path = _part_path("vlm", "path")
    lesions_path = _part_path("lesions", "file")
    adapter_path = _part_path("vlm", "adapter")
    del _part_path

    # -- identity -----------------------------------------------------------
    @property
    def device_uid(self) -> str:
        """A DICOM UID that changes exactly when a model file changes."""
        parts = [self.manifest.name, self.manifest.version]
        if self.manifest.selector:
            parts.append(self.manifest.selector.sha256 or "")
        if self.manifest.vlm:
            parts.append(self.manifest.vlm.sha256 or "")
        if self.manifest.lesions:  # bundles without a lesion model keep their Device UID
            parts.append("lesions:" + (self.manifest.lesions.sha256 or ""))
        digest = hashlib.sha256("|".join(parts).encode()).digest()[:16]
        return _UID_ROOT + str(uuid.UUID(bytes=digest).int)

    def model_info(self) -> ModelInfo:
        m = self.manifest
        return ModelInfo(
            name=m.name,
            version=m.version,
            device_uid=self.device_uid,
            selector=f"{m.selector.arch} {m.selector.version}" if m.selector else "",
            vlm=f"{m.vlm.family} {m.vlm.version}" if m.vlm else "",
            adapter=m.vlm.adapter or "" if m.vlm else "",
            synthetic_demo=m.synthetic_demo,
            lesions=f"{m.lesions.arch} {m.lesions.version}" if m.lesions else "",
        )

    # -- load / save --------------------------------------------------------
    @classmethod
    def load(cls, root: str | Path, verify: bool = True) -> "Bundle":
        root = Path(root)
        mf = root / MANIFEST
        if not mf.is_file():
            raise BundleError(f"no model bundle at {root} ({MANIFEST} missing); "
                              "build one with `cag-node demo --prepare` or set models.bundle")
        try:
            manifest = Manifest.model_validate_json(mf.read_text(encoding="utf-8"))
        except Exception as exc:  # pydantic ValidationError or JSON error
            raise BundleError(f"{mf}: invalid manifest: {exc}") from None
        b = cls(root, manifest)
        if verify:
            b.verify()
        return b

    def _check_file(self, what: str, path: Path, name: str, sha256: Optional[str]) -> None:
        if not path.is_file():
            raise BundleError(f"bundle {self.root}: {what} file {name} missing")
        if sha256 and sha256_file(path) != sha256:
            raise BundleError(f"bundle {self.root}: {name} does not match its manifest sha256")

    def verify(self) -> None:
        s = self.manifest.selector
        if s is not None:
            if tuple(s.classes) != CLASS_NAMES:
                raise BundleError(f"bundle {self.root}: selector.classes must be {list(CLASS_NAMES)}, got {s.classes}")
            self._check_file("selector", self.selector_path, s.file, s.sha256)
        les = self.manifest.lesions
        if les is not None:
            self._check_file("lesion model", self.lesions_path, les.file, les.sha256)
        v = self.manifest.vlm
        if v is not None:
            p = self.vlm_path
            if not p.is_dir():
                raise BundleError(f"bundle {self.root}: VLM directory {v.path} missing")
            if v.sha256 and sha256_dir(p) != v.sha256:
                raise BundleError(f"bundle {self.root}: VLM files in {v.path} do not match the manifest sha256")

    def save_manifest(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / MANIFEST).write_text(
            json.dumps(self.manifest.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n",
            encoding="utf-8",
        )


def update_manifest(root: str | Path, **sections: Any) -> Manifest:
    """Create or update ``root/manifest.json`` (used by export/training to add their section)."""
    root = Path(root)
    mf = root / MANIFEST
    manifest = Manifest.model_validate_json(mf.read_text()) if mf.is_file() else Manifest()
    data = manifest.model_dump()
    data.update({k: (v.model_dump() if isinstance(v, BaseModel) else v) for k, v in sections.items()})
    manifest = Manifest.model_validate(data)
    Bundle(root, manifest).save_manifest()
    return manifest
