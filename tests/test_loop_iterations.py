"""SAND beyond one iteration: the unrolled asset graph of `iterations: 3` (which edges join the iterations)."""

from sand.experiment import EnvEval, EvalConfig, Experiment, SandConfig
from sand_assets.loop import build_loop_assets
from sand_assets.models import build_model_assets

STAGES = ("candidate_samples", "rollouts", "action_critiques", "deliberations", "deliberation_dataset",
          "finetuned_checkpoint", "evaluation")


def dependencies(assets) -> dict[str, set[str]]:
    """Asset key -> the keys it depends on, from the assets' specs."""
    return {spec.key.to_user_string(): {dep.asset_key.to_user_string() for dep in spec.deps}
            for asset in assets for spec in asset.specs}


def test_three_iterations_chain_each_on_the_one_before():
    exp = Experiment(name="g", base_model="unused", sand=SandConfig(iterations=3),
                     evaluation=EvalConfig(envs={"alfworld": EnvEval(splits=["valid_seen"])}))
    deps = dependencies([*build_model_assets(exp), *build_loop_assets(exp)])
    loop_keys = {k for k in deps if k.startswith("g/iter_") and not k.startswith("g/iter_0/")}
    assert loop_keys == {f"g/iter_{k}/{stage}" for k in (1, 2, 3) for stage in STAGES}

    def data(k):  # D_k and pi_k as asset keys
        return "g/d0" if k == 0 else f"g/iter_{k}/deliberation_dataset"

    def policy(k):
        return "g/sft_checkpoint" if k == 0 else f"g/iter_{k}/finetuned_checkpoint"

    def iteration_of(key):
        return int(key.split("/")[1].removeprefix("iter_")) if key.startswith("g/iter_") else 0

    for k in (1, 2, 3):
        # Iteration k reads D_{k-1} and pi_{k-1}, and nothing older than iteration k-1 but the base model.
        assert {data(k - 1), policy(k - 1)} <= deps[f"g/iter_{k}/candidate_samples"]
        assert policy(k - 1) in deps[f"g/iter_{k}/rollouts"]
        assert deps[f"g/iter_{k}/finetuned_checkpoint"] >= {data(k), policy(k - 1)}
        assert deps[f"g/iter_{k}/evaluation"] == {policy(k)}
        earlier = {d for stage in STAGES for d in deps[f"g/iter_{k}/{stage}"]
                   if iteration_of(d) < k and d != "g/base_model"}
        assert earlier == {data(k - 1), policy(k - 1)}
        # Within an iteration the edges are the same for every k.
        within = {(stage, d.rpartition("/")[2]) for stage in STAGES for d in deps[f"g/iter_{k}/{stage}"]
                  if d.startswith(f"g/iter_{k}/")}
        assert within == {("rollouts", "candidate_samples"), ("action_critiques", "rollouts"),
                          ("deliberations", "candidate_samples"), ("deliberations", "rollouts"),
                          ("deliberations", "action_critiques"), ("deliberation_dataset", "deliberations"),
                          ("finetuned_checkpoint", "deliberation_dataset"), ("evaluation", "finetuned_checkpoint")}
    # No iteration reads a later one.
    assert all(iteration_of(d) <= iteration_of(key) for key, ds in deps.items() for d in ds)

