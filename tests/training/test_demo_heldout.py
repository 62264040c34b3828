"""The demo build measures the finished bundle on held-out studies (another seed)."""

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")


def test_heldout_measurement_of_a_bundle(quick_bundle, tmp_path):
    from training.demo import DEMO, _measure_heldout
    from training.synthetic import generate_dataset

    assert DEMO["test_seed_offset"] and DEMO["test_studies"] >= 40
    data = tmp_path / "heldout"
    records = generate_dataset(data, 2, 424242, size=128, frames=16, progress=False, targets=2, domain=DEMO["domain"])
    out = _measure_heldout(quick_bundle, data)
    s = out["summary"]
    assert s["runs"] == len(records) and s["studies"] == 2
    for key in ("selector_laterality_f1", "selector_key_frame_accuracy", "vlm_language_agreement",
                "vlm_en_side_f1", "vlm_en_treatment_agreement", "vlm_ja_baseline_treatment_agreement",
                "lesions_vessel_dice", "lesions_lesion_sensitivity", "lesions_segment_accuracy",
                "lesions_severity_within_one_grade", "templated_en_treatment_agreement"):
        assert 0.0 <= s[key] <= 1.0, key
    assert s["lesions_false_positives_per_frame"] >= 0 and s["lesions_latency_ms_per_frame"] > 0
    # the VLM was trained with concepts and is given what the bundle's lesion model saw
    assert out["vlm"]["concepts"].startswith("lesions")
    # the full metrics travel along (build-summary.json)
    assert out["selector"]["laterality_confusion"] and out["vlm"]["en"]["clinical"]["n"] == 2
