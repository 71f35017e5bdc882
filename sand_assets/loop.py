"""The SAND loop, unrolled per iteration so the UI shows every edge, one asset per table:

  D_{k-1} + pi_{k-1} ─► iter_k/candidate_samples ─► iter_k/rollouts ─► iter_k/action_critiques
  candidates + rollouts + critiques ─► iter_k/deliberations ─► iter_k/deliberation_dataset (D_k)
  D_k + pi_{k-1} ─► iter_k/finetuned_checkpoint (pi_k) ─► iter_k/evaluation
  D_{k-1} + pi_{k-1} + pi_k's steps ─► iter_k/control_checkpoint ─► iter_k/control_evaluation   (sand.control)

Each asset runs one engine stage (sand.stages), which writes dataset `<exp>/iter_k` of its table(s) with a
lineage row naming the exact versions it read; where one stage writes two tables it is a multi-asset.
Checks: D_k's content (blocking), the deliberation fallback rate (a warning), pi_k's folder (blocking).
"""
from dagster import (
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    AssetSpec,
    MaterializeResult,
    MetadataValue,
    asset,
    multi_asset,
)

from resources import AlfWorldResource, ComputeResource, SciWorldResource, StoreResource
from sand import stages
from sand.experiment import Experiment
from sand.sand_loop.review import deliberation_review
from sand.validation import trajectory_problems
from sand_assets.common import backends, check_result, dataset_result, environments, lineage_of
from sand_assets.models import D_K_CHECK, evaluation_asset, finetune_asset


def _key(exp: Experiment, k: int, name: str) -> AssetKey:
    return AssetKey([exp.name, f"iter_{k}", name])


def build_loop_assets(exp: Experiment) -> list[AssetsDefinition]:
    assets = []
    data, checkpoint = AssetKey([exp.name, "d0"]), AssetKey([exp.name, "sft_checkpoint"])
    for k in range(1, exp.sand.iterations + 1):
        assets += _iteration(exp, k, data, checkpoint)
        data, checkpoint = _key(exp, k, "deliberation_dataset"), _key(exp, k, "finetuned_checkpoint")
    return assets


def _iteration(exp: Experiment, k: int, data_key: AssetKey, checkpoint_key: AssetKey) -> list[AssetsDefinition]:
    s, group = exp.sand, exp.name
    code = {stage: stages.stage_code(stage) for stage in ("sampling", "critique", "synthesis")}
    keys = {name: _key(exp, k, name) for name in ("candidate_samples", "rollouts", "action_critiques",
                                                  "deliberations", "deliberation_dataset")}

    @asset(key=keys["candidate_samples"], group_name=group, deps=[data_key, checkpoint_key], pool="gpu",
           kinds={"python", "parquet"}, code_version=code["sampling"],
           description=f"Self-consistency sampling: pi_{k - 1} samples {s.n_samples} actions at every step of "
                       f"D_{k - 1}; steps whose candidates disagree are uncertain.")
    def candidate_samples(context: AssetExecutionContext, store: StoreResource,
                          compute: ComputeResource) -> MaterializeResult:
        result = stages.sample(exp, store.store(), k, backends(exp, compute), lineage_of(context), code["sampling"],
                               context.log.info)
        return dataset_result(result.written["candidates"], **result.counts)

    critique_keys = {"rollouts": keys["rollouts"], "critiques": keys["action_critiques"]}

    @multi_asset(name="__".join(keys["action_critiques"].path), group_name=group, pool="gpu", specs=[
        AssetSpec(keys["rollouts"], deps=[data_key, keys["candidate_samples"], checkpoint_key],
                  kinds={"python", "parquet"}, code_version=code["critique"],
                  description=f"Execution-guided rollouts: every candidate of an uncertain step executed, then "
                              f"pi_{k - 1} plays on."),
        AssetSpec(keys["action_critiques"], deps=[keys["rollouts"]], kinds={"python", "parquet"},
                  code_version=code["critique"],
                  description="The frozen critic's verdict and insight on each rolled-out candidate.")])
    def action_critiques(context: AssetExecutionContext, store: StoreResource, compute: ComputeResource,
                         sciworld: SciWorldResource, alfworld: AlfWorldResource):
        result = stages.critique(exp, store.store(), k, backends(exp, compute), environments(sciworld, alfworld),
                                 lineage_of(context, critique_keys), code["critique"], context.log.info)
        counts = result.counts
        yield dataset_result(result.written["rollouts"], keys["rollouts"], rollouts=counts["rollouts"])
        yield dataset_result(result.written["critiques"], keys["action_critiques"],
                             **{n: v for n, v in counts.items() if n != "rollouts"})

    synthesis_keys = {"deliberations": keys["deliberations"], "trajectories": keys["deliberation_dataset"]}

    @multi_asset(name="__".join(keys["deliberation_dataset"].path), group_name=group, pool="gpu", specs=[
        AssetSpec(keys["deliberations"], kinds={"python", "parquet"}, code_version=code["synthesis"],
                  deps=[data_key, keys["candidate_samples"], keys["rollouts"], keys["action_critiques"]],
                  description="The writer's deliberation thought at each uncertain step (or its fallback)."),
        AssetSpec(keys["deliberation_dataset"], deps=[keys["deliberations"]], kinds={"python", "parquet"},
                  code_version=code["synthesis"],
                  description=f"D_{k}: the deliberation thought replaces the thought at uncertain steps, ending at the "
                              "expert action; confident steps keep theirs, and trajectories outside the "
                              "deliberated share are carried over unchanged.")],
                 check_specs=[
                     AssetCheckSpec(D_K_CHECK, asset=keys["deliberation_dataset"], blocking=True,
                                    description="D_k's schema and content (sand.validation)."),
                     AssetCheckSpec("fallback_rate", asset=keys["deliberations"],
                                    description=f"Warns when more than {stages.FALLBACK_WARNING_RATE:.0%} of the "
                                                "deliberations are fallbacks (the writer's thought failed "
                                                "validation twice), or when an uncertain step has no "
                                                "deliberation that fits the agent's reply budget.")])
    def deliberation_dataset(context: AssetExecutionContext, store: StoreResource, compute: ComputeResource):
        result = stages.synthesize(exp, store.store(), k, backends(exp, compute), lineage_of(context, synthesis_keys),
                                   code["synthesis"], context.log.info)
        n, fallbacks = result.counts["deliberations"], result.counts["fallbacks"]
        rate = fallbacks / n if n else 0.0
        too_many = [f"{fallbacks} of {n} deliberations are fallbacks"] if rate > stages.FALLBACK_WARNING_RATE else []
        if result.counts["unfit"]:
            too_many.append(f"{result.counts['unfit']} uncertain steps keep their thought: no deliberation fits the "
                            f"agent's reply budget (evaluation.max_new_tokens)")
        review = deliberation_review(store.store(), stages.iteration_dataset(exp, k),
                                     stages.iteration_dataset(exp, k - 1))
        yield dataset_result(result.written["deliberations"], keys["deliberations"], checks=(
            check_result("fallback_rate", too_many, keys["deliberations"], warn=True, rate=round(rate, 3)),),
            review=MetadataValue.md(review), **result.counts)
        dk = result.written["trajectories"]
        yield dataset_result(dk, keys["deliberation_dataset"], checks=(
            check_result(D_K_CHECK, trajectory_problems(dk.rows), keys["deliberation_dataset"]),))

    finetuned = finetune_asset(
        exp, k, _key(exp, k, "finetuned_checkpoint"), deps=[keys["deliberation_dataset"], checkpoint_key],
        description=f"pi_{k}: pi_{k - 1} finetuned on D_{k} (continued, not restarted from the base model).")
    evaluation = evaluation_asset(exp, f"iter_{k}", k, _key(exp, k, "evaluation"), deps=[finetuned.key],
                                  description=f"pi_{k}, greedy, on the evaluation splits.")
    assets = [candidate_samples, action_critiques, deliberation_dataset, finetuned, evaluation]
    if s.control:
        control = finetune_asset(
            exp, k, _key(exp, k, "control_checkpoint"), deps=[data_key, checkpoint_key, finetuned.key], control=True,
            description=f"control_{k}: pi_{k - 1} trained on D_{k - 1} unchanged (no deliberations) for as many "
                        f"optimizer steps as pi_{k}, with the same settings: iter_{k} vs control_{k} is SAND's "
                        "effect, not the extra training's.")
        assets += [control, evaluation_asset(exp, f"control_{k}", k, _key(exp, k, "control_evaluation"),
                                             deps=[control.key], control=True,
                                             description=f"control_{k}, greedy, on the evaluation splits.")]
    return assets
