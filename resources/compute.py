import os
from typing import Literal

from dagster import ConfigurableResource
from pydantic import Field


class ComputeResource(ConfigurableResource):
    """Where model and environment work runs. Assets that load models also run in the `gpu` concurrency
    pool, so a node never holds more model jobs than the pool's limit (`dagster instance concurrency set
    gpu N`). Environments of evaluations and critique rollouts run as threads of the run's process, or
    with `env_workers: ray` one per Ray actor (docs/scale-out.md)."""

    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    torch_threads: int = Field(0, description="torch intra-op threads on CPU; 0 = torch's default")
    env_workers: Literal["local", "ray"] = Field(
        "local", description="where environments run: 'local' (threads of the run's process) or 'ray' "
                             "(one Ray actor each; needs the project's `ray` extra)")
    ray_address: str | None = Field(
        None, description="with env_workers 'ray': the cluster ('auto', 'ray://head:10001', ...); "
                          "None: RAY_ADDRESS if set, else a local Ray started by the run")
    ray_env_cpus: float = Field(0.25, description="CPUs each environment actor reserves on Ray")

    def apply(self) -> None:
        if self.torch_threads:
            import torch

            torch.set_num_threads(self.torch_threads)
            os.environ["OMP_NUM_THREADS"] = str(self.torch_threads)
