"""The readable view of deliberated steps: original thought, candidates with execution and critique, the
deliberation that replaced the thought."""
from sand.sand_loop.critique import Critique, candidate_key
from sand.sand_loop.deliberation import Deliberation
from sand.sand_loop.review import render_deliberations
from sand.trajectory import Step, Trajectory


def trajectory():
    steps = [Step("I should look around.", "look", "You are in a kitchen."),
             Step("The apple may be in the fridge.", "open fridge 1", "You open the fridge. You see an apple."),
             Step("Take it.", "take apple from fridge 1", "You pick up the apple.")]
    return Trajectory(id="t1", env="alfworld", task="pick apple", task_id="game1", split="train", source="observer",
                      instruction="Your task is to: put an apple in the sink.", steps=steps, reward=1.0)


def critique(t, action, verdict, observation, valid=True, won=False, after=0.0):
    key = candidate_key(t, 1, action)
    return Critique(*key, trajectory_id=t.id, step=1, verdict=verdict, verdict_inferred=False,
                    text=f"Verdict: {verdict}\nInsight: If I {action}, | then ...", critic="base", insight_written=True,
                    valid=valid, observation=observation, score_before=0.0, score_after=after, score_end=after,
                    won=won, steps=3, evidence=verdict)


def deliberation(step, candidates, fallback=False):
    return Deliberation(trajectory_id="t1", step=step, thought=f"Thought at {step}: \"open fridge 1\" is best.",
                        answer="open fridge 1", candidates=candidates, fallback=fallback, retried=False, mode="sand",
                        rejection=None, repeated=False, named=2, valid=True)


def test_deliberations_render_side_by_side():
    t = trajectory()
    critiques = [critique(t, "open fridge 1", "advance", "You open the fridge. You see an apple.", won=True),
                 critique(t, "go to drawer 3", "not affect", "Nothing happens.", valid=False)]
    text = render_deliberations([t], [deliberation(1, ["open fridge 1", "go to drawer 3"]),
                                      deliberation(2, ["take apple from fridge 1"], fallback=True)], critiques, limit=1)
    lines = text.splitlines()
    assert lines[0] == "2 deliberated steps; 1 shown."
    assert "### t1, step 1 (alfworld: pick apple)" in lines  # the step weighing more candidates comes first
    assert "> The apple may be in the fridge." in lines  # the expert's original thought
    expert_row = next(line for line in lines if line.startswith("| `open fridge 1` (expert)"))
    assert "You open the fridge. You see an apple. (won, 3 steps)" in expert_row
    assert "Insight: If I open fridge 1, \\| then ..." in expert_row  # a pipe would break the table
    other = next(line for line in lines if line.startswith("| `go to drawer 3` |"))
    assert "rejected by the environment: Nothing happens." in other and "Verdict: not affect" in other
    assert "> Thought at 1: \"open fridge 1\" is best." in lines
    assert "Thought at 2" not in text


def test_nothing_deliberated():
    assert render_deliberations([trajectory()], [], []) == "No deliberated steps."
