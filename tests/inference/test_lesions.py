"""Lesion post-processing (inference.lesions) on hand-made model maps, and the templated draft
written from lesion findings (inference.reporting)."""

from __future__ import annotations

import numpy as np
import pytest

from inference.lesions import FrameMaps, Geometry, decode_maps, qca_diameters
from inference.reporting import findings_from_lesions, templated_report
from inference.types import LesionFinding, grade_of


def _vessel_maps(S=128, width=8, narrow_at=64, narrow_to=2, seg=6, peak=(64, 64), heat=0.9, sev=0.78):
    """A horizontal vessel of ``width`` px along row 64, narrowed to ``narrow_to`` px around
    column ``narrow_at``; segment ``seg`` everywhere on it; a heatmap peak at ``peak``."""
    yy, xx = np.mgrid[0:S, 0:S]
    half = np.where(np.abs(xx - narrow_at) < 5, narrow_to / 2, width / 2)
    vessel = (np.abs(yy - 64) <= half).astype(np.float32)
    segment = np.where(vessel > 0, seg, 0).astype(np.uint8)
    r, c = peak
    hm = (heat * np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * 2.5 ** 2))).astype(np.float32)
    severity = np.full((S, S), sev, np.float32)
    return FrameMaps(vessel, segment, hm, severity)


def test_decode_finds_the_peak_with_segment_severity_and_qca():
    fm = _vessel_maps()
    found = decode_maps(fm, peak_threshold=0.3, min_distance=6)
    assert len(found) == 1
    les = found[0]
    assert (les.row, les.col) == (64.0, 64.0)
    assert les.segment == 6
    assert les.stenosis_pct == pytest.approx(78.0, abs=0.5)
    assert les.confidence == pytest.approx(0.9, abs=1e-3)
    # QCA from the mask: the lumen is ~3 px at the lesion, ~9 px in the healthy part
    assert les.minimal_diameter < les.reference_diameter
    assert 1 - les.minimal_diameter / les.reference_diameter > 0.5


def test_below_threshold_and_off_vessel_peaks_are_dropped():
    assert decode_maps(_vessel_maps(heat=0.2), peak_threshold=0.3) == []
    # a strong peak far from any vessel pixel: no segment to name, not reported
    assert decode_maps(_vessel_maps(peak=(10, 10)), peak_threshold=0.3) == []


def test_close_peaks_are_suppressed():
    fm = _vessel_maps()
    yy, xx = np.mgrid[0:128, 0:128]
    fm.heatmap = np.maximum(fm.heatmap, 0.8 * np.exp(-((yy - 64) ** 2 + (xx - 67) ** 2) / 4.0)).astype(np.float32)
    assert len(decode_maps(fm, min_distance=6)) == 1
    fm.heatmap = np.maximum(fm.heatmap, 0.8 * np.exp(-((yy - 64) ** 2 + (xx - 100) ** 2) / 4.0)).astype(np.float32)
    assert len(decode_maps(fm, min_distance=6)) == 2


def test_qca_of_an_occlusion_is_zero_lumen():
    fm = _vessel_maps(narrow_to=-2)  # the lumen vanishes around column 64
    mld, ref = qca_diameters(fm.vessel > 0.5, fm.segment, 64, 64, 6)
    assert mld == 0.0 and ref > 5


@pytest.mark.parametrize("rows,cols,size", [(512, 512, 256), (256, 256, 256), (480, 640, 256)])
def test_geometry_round_trip_and_letterbox(rows, cols, size):
    g = Geometry(rows, cols, size)
    for x, y in [(0.5, 0.5), (cols / 2, rows / 2), (cols - 0.5, rows - 0.5)]:
        c, r = g.to_model(x, y)
        assert g.to_stored(c, r) == pytest.approx((x, y))
        assert -0.5 <= c <= size - 0.5 and -0.5 <= r <= size - 0.5
    if rows != cols:  # the letterbox band: the frame's top-left pixel is below the square's top
        assert g.to_model(0.5, 0.5)[1] > 0


def _lf(seg, pct, conf, sop="1.2.3", frame=3):
    return LesionFinding(sop, frame, seg, pct, 10.0, 10.0, conf)


def test_findings_from_lesions_one_per_segment_most_confident_grade():
    fs = findings_from_lesions([_lf(6, 91, 0.9), _lf(6, 60, 0.4), _lf(2, 75, 0.8), _lf(13, 30, 0.9)])
    assert fs == [{"vessel": "LAD", "segment": 6, "severity": 90, "side": "LCA"},
                  {"vessel": "RCA", "segment": 2, "severity": 75, "side": "RCA"}]
    assert findings_from_lesions([_lf(6, 91, 0.2)], min_confidence=0.5) == []


def test_templated_report_follows_the_lesions():
    rep = templated_report(findings_from_lesions([_lf(6, 99, 0.9), _lf(11, 90, 0.9), _lf(2, 75, 0.8)]))
    assert set(rep) == {"en", "ja"} and all(r.format_ok for r in rep.values())
    assert "99% stenosis in the proximal LAD (segment 6)" in rep["en"].findings
    assert "CABG" in rep["en"].recommendation  # three-vessel disease
    assert "#6" in rep["ja"].findings and "CABG" in rep["ja"].recommendation
    normal = templated_report([], sides=["LCA"])
    assert "no significant stenosis" in normal["en"].findings
    assert "Right coronary" not in normal["en"].findings
    assert "Medical therapy" in normal["en"].recommendation


def test_lesion_finding_validates_and_grades():
    with pytest.raises(ValueError, match="segment"):
        _lf(16, 50, 0.5)
    with pytest.raises(ValueError, match="frame_number"):
        _lf(6, 50, 0.5, frame=0)
    with pytest.raises(ValueError, match="stenosis_pct"):
        _lf(6, 120, 0.5)
    assert [grade_of(p) for p in (10, 49, 62, 80, 95, 99.4, 100)] == [25, 50, 50, 75, 99, 99, 100]
    d = _lf(1, 88, 0.7).to_dict()
    assert d["vessel"] == "RCA" and d["side"] == "RCA" and d["grade"] == 90
