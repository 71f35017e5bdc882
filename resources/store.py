
from pathlib import Path

from dagster import ConfigurableResource

from sand.config import sand_home
from sand.store import Store


class StoreResource(ConfigurableResource):
    """The versioned Parquet store and DuckDB catalog under SAND_HOME (or `home`)."""

    home: str | None = None

    def store(self) -> Store:
        return Store(self.home)

    @property
    def root(self) -> Path:
        return Path(self.home).resolve() if self.home else sand_home()

    def inbox(self, env: str) -> Path:
        """Drop ETO files into SAND_HOME/inbox/<env>/ and the inbox sensor imports them."""
        path = self.root / "inbox" / env
        path.mkdir(parents=True, exist_ok=True)
        return path
