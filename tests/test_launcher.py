"""The multi-process training path of a GPU node, on CPU: the checkpoint asset trains the tiny model through
`train.launcher` = `accelerate launch` with two processes (DDP over gloo), and the shipped accelerate configs
are what accelerate's own loader and plugins accept."""
import json

import pytest
from dagster import PipesSubprocessClient, instance_for_test, materialize

from resources import StoreResource
from sand import datasets
from sand.experiment import Experiment, TrainConfig
from sand.models.checkpoints import plan_training
from sand.models.registry import tiny_model
from sand.store import Lineage, Store
from sand_assets.expert_data import expert_trajectories
from sand_assets.models import build_model_assets
from tests.conftest import DATA, REPO

# `--cpu --num_processes 2` starts one process (accelerate runs several CPU processes only under mpirun);
# `--multi_gpu` starts them through torchrun, and without a GPU each rank trains on the CPU over gloo.
TWO_PROCESSES = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]


@pytest.mark.slow
def test_two_process_launcher_writes_one_checkpoint_and_reports_once(sand_home):
    store = Store(sand_home)
    datasets.import_eto(store, DATA / "eto_alfworld_sample.json", "alfworld", Lineage(asset="test"))
    datasets.compose_expert(store, Lineage(asset="test"))
    train = TrainConfig(max_steps=2, per_device_batch_size=1, gradient_accumulation_steps=1, max_length=512)
    exp = Experiment(name="ddp", base_model=str(tiny_model()), train_data={"alfworld": None},
                     train=train.model_copy(update={"launcher": TWO_PROCESSES}))
    base_model, d0, sft_checkpoint = build_model_assets(exp)[:3]
    with instance_for_test() as instance:
        # The asset fails unless the child reports its metrics exactly once (rank 0 alone talks to Dagster).
        result = materialize([expert_trajectories, base_model, d0, sft_checkpoint],
                             selection=[base_model, d0, sft_checkpoint], instance=instance,
                             resources={"store": StoreResource(home=str(sand_home)), "pipes": PipesSubprocessClient()})
        assert result.success
        progress = [e.user_message for e in instance.all_logs(result.run_id) if '"max_steps"' in e.user_message]
    assert len(progress) == 2  # one line per optimizer step: the other rank's progress never reaches Dagster

    # One folder, complete, written by two processes; the launcher is not part of the checkpoint's identity, so
    # a single-process run of the same plan finds this folder.
    single = plan_training(exp.model_copy(update={"train": train}), store, 0, store.head("trajectories", "ddp/d0"),
                           None)
    row = store.sql("select path, train_steps from checkpoints where experiment = 'ddp'").row(0, named=True)
    assert store.resolve(row["path"]) == single.output and row["train_steps"] == 2
    assert list((sand_home / "checkpoints").iterdir()) == [single.output]
    metrics = json.loads((single.output / "train_metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == 2
    assert (single.output / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("name", ["deepspeed_zero3.yaml", "fsdp.yaml"])
def test_shipped_accelerate_configs_build_plugins_that_save_a_whole_model(name, monkeypatch):
    """ZeRO-3 and FSDP need GPUs to run, but accelerate reads their configs without one: the launcher's own
    validation, the environment it hands every rank, and the plugin each rank builds from it."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    path = REPO / "configs" / "accelerate" / name
    parser = launch_command_parser()
    args, config, _ = _validate_launch_command(parser.parse_args(["--config_file", str(path), "-m", "x"]))
    # accelerate copies each nested option onto its launch arguments and drops any it does not know, silently.
    options = {action.dest for action in parser._actions}
    nested = config.deepspeed_config or config.fsdp_config
    assert nested and set(nested) <= options, f"{path}: options accelerate ignores: {set(nested) - options}"
    assert args.num_processes == 8 and args.mixed_precision == "bf16"
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(config.deepspeed_config)  # as `launch` sets it
        _, env = prepare_deepspeed_cmd_env(args)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        zero = DeepSpeedPlugin().deepspeed_config["zero_optimization"]
        # Trainer.save_model writes model weights under ZeRO-3 only when they are gathered to 16 bits on save.
        assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    else:
        assert args.use_fsdp
        for key, value in prepare_multi_gpu_env(args).items():
            monkeypatch.setenv(key, value)
        plugin = FullyShardedDataParallelPlugin()
        # Trainer.save_model writes no weights at all from a sharded state dict.
        assert plugin.fsdp_version == 2 and plugin.state_dict_type.name == "FULL_STATE_DICT"
