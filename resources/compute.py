import os

from dagster import ConfigurableResource
from pydantic import Field


class ComputeResource(ConfigurableResource):
    """Where model work runs. Assets that load models also run in the `gpu` concurrency pool, so
    a node never holds more model jobs than the pool's limit (`dagster instance concurrency set gpu N`)."""

    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    torch_threads: int = Field(0, description="torch intra-op threads on CPU; 0 = torch's default")

    def apply(self) -> None:
        if self.torch_threads:
            import torch

            torch.set_num_threads(self.torch_threads)
            os.environ["OMP_NUM_THREADS"] = str(self.torch_threads)
