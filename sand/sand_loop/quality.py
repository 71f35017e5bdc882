"""Quality figures of the texts the base model writes, from the per-row flags of `critiques` and
`deliberations` (so the same figures can be recomputed with SQL over the catalog). All values are numbers,
so a UI can plot them across runs; rates are None-free (0.0 over no rows)."""
from __future__ import annotations

from sand.sand_loop.critique import VERDICTS, Critique
from sand.sand_loop.deliberation import Deliberation


def _rate(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


def critique_quality(critiques: list[Critique]) -> dict[str, float]:
    """Verdicts the critic wrote (chosen) vs inferred (its backend could not choose: the evidence verdict stands
    in), how often a written verdict agrees with the evidence verdict, how often the insight is the critic's,
    and how the evidence verdicts are spread."""
    written = [c for c in critiques if not c.verdict_inferred]
    return {
        "verdicts_written": len(written),
        "verdicts_inferred": len(critiques) - len(written),
        "written_verdict_rate": _rate(len(written), len(critiques)),
        "verdict_agreement": _rate(sum(c.agrees for c in written), len(written)),
        "insight_written_rate": _rate(sum(c.insight_written for c in critiques), len(critiques)),
        **{f"evidence/{v}": sum(c.evidence == v for c in critiques) for v in VERDICTS},
    }


def deliberation_quality(deliberations: list[Deliberation]) -> dict[str, float]:
    """Share of stored thoughts that pass the validator, share written from the evidence because the writer
    failed twice, distinct candidates named in quotes per thought, and share of deliberations where a thought
    the writer wrote repeated a sentence."""
    n = len(deliberations)
    return {
        "deliberation_validity_rate": _rate(sum(d.valid for d in deliberations), n),
        "fallback_rate": _rate(sum(d.fallback for d in deliberations), n),
        "distinct_candidates_per_deliberation": round(sum(d.named for d in deliberations) / n, 3) if n else 0.0,
        "repeated_sentence_rate": _rate(sum(d.repeated for d in deliberations), n),
    }
