"""C-arm geometry: DICOM XA positioner angles -> perspective projection.

Patient coordinates are DICOM LPS in millimetres (x: patient's left, y: posterior,
z: head), origin at the isocentre.  ``PositionerPrimaryAngle`` > 0 is LAO (the
detector moves to the patient's left), < 0 RAO; ``PositionerSecondaryAngle`` > 0 is
cranial, < 0 caudal.  At 0/0 the beam runs posterior -> anterior (source under the
table) and the image is displayed as seen from the detector: patient's left on the
screen's right, head up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class CArm:
    primary: float  # degrees, + LAO / - RAO
    secondary: float  # degrees, + cranial / - caudal
    sid: float = 1100.0  # source-image (detector) distance, mm
    sod: float = 760.0  # source-isocentre distance, mm (DistanceSourceToPatient)
    fov_mm: float = 200.0  # detector field of view (square), mm
    size: int = 512  # pixels
    pan: tuple = (0.0, 0.0)  # detector-plane offset (pixels), table pan

    d: np.ndarray = field(init=False, repr=False)
    u: np.ndarray = field(init=False, repr=False)
    v: np.ndarray = field(init=False, repr=False)
    source: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        a = np.deg2rad(self.primary)
        b = np.deg2rad(self.secondary)
        d_a = np.array([np.sin(a), -np.cos(a), 0.0])
        u = np.array([np.cos(a), np.sin(a), 0.0])
        z = np.array([0.0, 0.0, 1.0])
        self.d = d_a * np.cos(b) + z * np.sin(b)  # source -> detector
        self.u = u  # screen right
        self.v = -z * np.cos(b) + d_a * np.sin(b)  # screen down
        self.source = -self.d * self.sod

    @property
    def pixel_mm(self) -> float:
        """Pixel size at the detector (ImagerPixelSpacing)."""
        return self.fov_mm / self.size

    @property
    def magnification(self) -> float:
        return self.sid / self.sod

    @property
    def pixel_mm_iso(self) -> float:
        """Pixel size at the isocentre."""
        return self.pixel_mm / self.magnification

    def project(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(N,3) patient mm -> (col, row, magnification) arrays (float)."""
        p = pts - self.source
        t = p @ self.d
        t = np.maximum(t, 1.0)
        mag = self.sid / t
        x = (p @ self.u) * mag
        y = (p @ self.v) * mag
        c = x / self.pixel_mm + self.size / 2 - 0.5 + self.pan[0]
        r = y / self.pixel_mm + self.size / 2 - 0.5 + self.pan[1]
        return c, r, mag

    def rays(self, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Unit ray directions (size, size, 3) from the source through each pixel centre."""
        n = size or self.size
        ps = self.fov_mm / n
        k = (np.arange(n) - n / 2 + 0.5) * ps
        cols = k - self.pan[0] * self.pixel_mm
        rows = k - self.pan[1] * self.pixel_mm
        pts = (
            self.d[None, None, :] * self.sid
            + cols[None, :, None] * self.u[None, None, :]
            + rows[:, None, None] * self.v[None, None, :]
        )
        pts /= np.linalg.norm(pts, axis=-1, keepdims=True)
        return self.source, pts

    def patient_orientation(self) -> list[str]:
        """DICOM PatientOrientation (row direction, column direction) letters."""
        return [_letters(self.u), _letters(self.v)]

    def view_name(self) -> str:
        return view_name(self.primary, self.secondary)


def _letters(vec: np.ndarray) -> str:
    names = (("L", "R"), ("P", "A"), ("H", "F"))
    order = np.argsort(-np.abs(vec))
    out = ""
    for i in order:
        if abs(vec[i]) < 0.25:
            continue
        out += names[i][0] if vec[i] > 0 else names[i][1]
    return out or "L"


def view_name(primary: float, secondary: float) -> str:
    p = int(round(primary))
    s = int(round(secondary))
    a = "AP" if abs(p) < 5 else (f"LAO {p}" if p > 0 else f"RAO {-p}")
    if abs(s) < 5:
        return a
    return f"{a} {'CRA' if s > 0 else 'CAU'} {abs(s)}"


def chord_ellipsoid(
    origin: np.ndarray, dirs: np.ndarray, center, axes, semi
) -> np.ndarray:
    """Path length of rays (origin + t*dirs) through an ellipsoid.

    ``axes`` (3,3) rows are the ellipsoid's unit axes, ``semi`` the semi-axis lengths
    (use np.inf for an infinite cylinder along that axis)."""
    axes = np.asarray(axes, float)
    semi = np.asarray(semi, float)
    inv = np.where(np.isinf(semi), 0.0, 1.0 / np.where(np.isinf(semi), 1.0, semi) ** 2)
    A = (axes.T * inv) @ axes
    o = np.asarray(origin, float) - np.asarray(center, float)
    Ad = dirs @ A  # (...,3)
    a = np.einsum("...i,...i->...", Ad, dirs)
    b = Ad @ o
    c = o @ A @ o - 1.0
    disc = b * b - a * c
    out = np.zeros(a.shape, dtype=np.float32)
    m = (disc > 0) & (a > 1e-12)
    out[m] = 2.0 * np.sqrt(disc[m]) / a[m]
    return out
