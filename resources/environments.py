
from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from sand.config import sand_home


class SciWorldResource(ConfigurableResource):
    """ScienceWorld (one JVM per environment object)."""

    simplifications: str = Field("easy", description="ScienceWorld simplifications; the paper's data uses 'easy'")
    jvm_heap_mb: int = Field(300, description="JVM heap cap per environment")
    call_timeout_s: float = Field(60.0, description="seconds any call to a JVM may take before the JVM counts as "
                                                   "stalled and is replaced (its episode starts again)")

    def open(self, task_names: list[str] | None = None, variations_per_task: int | None = None):
        from sand.envs.sciworld import ScienceWorldEnv

        return ScienceWorldEnv(simplifications=self.simplifications, jvm_heap_mb=self.jvm_heap_mb,
                               task_names=task_names or None, variations_per_task=variations_per_task,
                               call_timeout_s=self.call_timeout_s)


class AlfWorldResource(ConfigurableResource):
    """ALFWorld: real evaluation games from ALFWORLD_DATA, generated training games under SAND_HOME."""

    max_steps: int = Field(50, description="step limit per episode (ALFWorld's papers allow 50)")
    expert: str = Field("observer", description="'observer' (acts only on what it saw) or 'planner' (PDDL)")
    train_games: int = Field(30, description="number of generated training games")
    train_seed: int = Field(0, description="seed of the training game generator")
    heldout_games: int = Field(24, description="number of generated held-out games (the `heldout` split)")
    heldout_seed: int = Field(1, description="seed of the held-out games; must differ from train_seed")

    @property
    def train_games_dir(self) -> Path:
        return sand_home() / "games" / "alfworld" / f"train-seed{self.train_seed}"

    @property
    def heldout_games_dir(self) -> Path:
        return sand_home() / "games" / "alfworld" / f"heldout-seed{self.heldout_seed}"

    def open(self, games_per_split: int | None = None):
        from sand.envs.alfworld import AlfWorldEnv

        return AlfWorldEnv(max_steps=self.max_steps, expert=self.expert, games_per_split=games_per_split,
                           train_games_dir=self.train_games_dir, heldout_games_dir=self.heldout_games_dir,
                           pools={"train": (self.train_games, self.train_seed),
                                  "heldout": (self.heldout_games, self.heldout_seed)})
