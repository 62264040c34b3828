"""The reference reports of synthetic studies: the node's report templates
(:mod:`inference.reporting`), re-exported where the generator has always found them."""

from inference.reporting import (  # noqa: F401
    TERRITORIES,
    diseased_vessels,
    findings_text,
    impression_text,
    left_main_disease,
    make_report,
    recommendation_text,
    treatment,
)
