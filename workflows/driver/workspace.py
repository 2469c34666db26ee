"""Where a study keeps its state (MLflow store, checkpoints, prepared data), resolved once on the driver."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from workflows import storage

DEFAULT_WORKDIR = "./moelab-runs"  # a study's state (MLflow database, Ray Train storage) unless --workdir says otherwise


@dataclass
class Workspace:
    """Where a study keeps its state; everything is absolute because Ray workers run elsewhere."""

    root: Path
    tracking_uri: str
    # Checkpoints + prepared data on storage every node sees (multi-node): an NFS path or an object-store URI.
    shared_storage: str | None = None

    @classmethod
    def resolve(cls, workdir: str | Path, tracking_uri: str | None, storage_path: str | None = None) -> "Workspace":
        root = Path(workdir).expanduser().resolve()
        shared = None
        if storage_path:
            shared = storage_path if storage.is_uri(storage_path) else str(Path(storage_path).expanduser().resolve())
        return cls(root, tracking_uri or f"sqlite:///{root / 'mlflow.db'}", shared)

    @property
    def is_local_tracking(self) -> bool:
        return self.tracking_uri.startswith(("sqlite:", "file:")) or "://" not in self.tracking_uri

    @property
    def artifact_location(self) -> str | None:
        # A local store's default artifact root is relative to the process cwd; pin it inside the workdir.
        return (self.root / "mlartifacts").as_uri() if self.is_local_tracking else None

    @property
    def storage_path(self) -> str:
        return storage.join(self.shared_storage or self.root, "ray_results")

    def cell_storage(self, study_name: str) -> str:
        """Ray Train storage of a study's cells (run name = cell id). Per study: two studies in one workdir can share
        a cell id, and one must not resume from the other's checkpoints (its MLflow run would stay empty)."""
        return storage.join(self.storage_path, study_name)

    @property
    def cache_dir(self) -> Path:
        """Where data is prepared: on the shared filesystem when there is one (workers read it there); locally when
        the shared storage is an object store (the files are then published to `published_cache`)."""
        if self.shared_storage and not storage.is_uri(self.shared_storage):
            return Path(self.shared_storage) / "cache"
        return self.root / "cache"

    @property
    def published_cache(self) -> str | None:
        return storage.join(self.shared_storage, "cache") if self.shared_storage and storage.is_uri(self.shared_storage) \
            else None


def ray_checkpoints(run_location: str) -> list[str]:
    """A Ray Train run's checkpoint_<time>/ folders, oldest first (the run dir also holds checkpoint_*.json files);
    paths or URIs, whichever the storage is."""
    return [storage.join(run_location, name) for name in storage.subdirectories(run_location, "checkpoint_")]
