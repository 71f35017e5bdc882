"""A few deliberated steps, side by side, for a person to read: the expert's original thought, each candidate
with what executing it showed and the critic's critique, and the deliberation thought that replaced the
original. Markdown (the Dagster UI renders it in the deliberations asset's metadata)."""
from __future__ import annotations

from sand.sand_loop.critique import Critique, candidate_key
from sand.sand_loop.deliberation import Deliberation
from sand.sand_loop.tables import critiques_from_frame, deliberations_from_frame
from sand.store import Store
from sand.trajectory import Trajectory, from_frame


def _cell(text: str | None, limit: int = 300) -> str:
    text = " ".join((text or "").split())
    text = text if len(text) <= limit else text[:limit - 1] + "…"
    return text.replace("|", "\\|") or "-"


def _quote(text: str) -> str:
    return "\n".join(f"> {line}" for line in (text.strip() or "(none)").splitlines())


def _execution(c: Critique) -> str:
    if not c.valid:
        return f"rejected by the environment: {_cell(c.observation, 160)}"
    outcome = "won" if c.won else f"score {c.score_before:g} → {c.score_after:g} → {c.score_end:g}"
    return f"{_cell(c.observation, 160)} ({outcome}, {c.steps} steps)"


def render_deliberations(trajectories: list[Trajectory], deliberations: list[Deliberation],
                         critiques: list[Critique], limit: int = 3) -> str:
    """Up to `limit` deliberated steps as markdown, those weighing the most candidates first (the writer's
    own thoughts before fallbacks)."""
    by_id = {t.id: t for t in trajectories}
    critique_of = {c.key: c for c in critiques}
    shown = sorted((d for d in deliberations if d.trajectory_id in by_id),
                   key=lambda d: (d.fallback, -len(d.candidates), d.trajectory_id, d.step))[:limit]
    if not shown:
        return "No deliberated steps."
    parts = [f"{len(deliberations)} deliberated steps; {len(shown)} shown."]
    for d in shown:
        t = by_id[d.trajectory_id]
        expert = t.steps[d.step]
        parts += ["", f"### {t.id}, step {d.step} ({t.env}: {_cell(t.task, 80)})", "",
                  f"**Expert's original thought** (action `{expert.action}`):", "", _quote(expert.thought), "",
                  "| candidate | executing it showed | critique |", "|---|---|---|"]
        expert_key = candidate_key(t, d.step, expert.action)
        for action in d.candidates:
            key = candidate_key(t, d.step, action)
            c, mark = critique_of.get(key), " (expert)" if key == expert_key else ""
            parts.append(f"| `{_cell(action, 80)}`{mark} | {_execution(c) if c else '-'} | "
                         f"{_cell(c.text) if c else 'no critique'} |")
        label = "fallback, written from the evidence" if d.fallback else "written by the critic model"
        parts += ["", f"**Deliberation** ({label}; concludes `{d.answer}`):", "", _quote(d.thought)]
    return "\n".join(parts)


def deliberation_review(store: Store, dataset: str, previous: str, limit: int = 3) -> str:
    """`render_deliberations` of the current `deliberations` and `critiques` of `dataset` (an iteration's
    `<exp>/iter_k`), with the original thoughts from `previous` (D_{k-1} in `trajectories`)."""
    critiques = store.head("critiques", dataset)
    return render_deliberations(from_frame(store.read("trajectories", previous)),
                                deliberations_from_frame(store.read("deliberations", dataset)),
                                critiques_from_frame(store.read("critiques", dataset)) if critiques else [], limit)
