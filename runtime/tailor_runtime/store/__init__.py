"""The artifact store: one interface (`ArtifactStore`), two backends (local directory, S3)."""

from tailor_runtime.store.base import ArtifactStore, Manifest, open_store

__all__ = ["ArtifactStore", "Manifest", "open_store"]
