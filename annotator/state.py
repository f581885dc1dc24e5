"""What one annotator app holds besides per-request database handles, kept in app.extensions."""
from __future__ import annotations

from dataclasses import dataclass, field

from flask import current_app

from al_engine.config import RunConfig
from al_engine.data import Dataset
from oracle.human import ItemIds

from .db import AnnotatorDBError, database_gone_message, file_identity
from .images import PictureCache
from .worker import EngineDriver, EngineWorker


@dataclass
class AnnotatorState:
    """The app's run: its database path, settings, dataset, and the engine's driver and worker."""

    database: str
    run_config: RunConfig
    dataset: Dataset
    driver: EngineDriver
    worker: EngineWorker | None = None  # the background thread when START_ENGINE
    pictures: PictureCache = field(default_factory=PictureCache)  # item id -> the encoded picture shown
    instructions: str = ""  # the project's guidelines for annotators (Markdown), from --instructions
    ids: ItemIds | None = None  # pool position <-> stable item id (None: the same number)
    folder: object = None  # annotator.FolderReport of the start: unreadable, new and vanished files

    def pool_index(self, item_id: int) -> int | None:
        """The pool position of an item id, or None when its file is not in the pool."""
        if self.ids is None:
            return item_id if 0 <= item_id < int(self.dataset.train_images.shape[0]) else None
        return self.ids.pool_index(item_id)
    database_identity: tuple | None = None  # (device, inode) of the database file at start

    def __post_init__(self):
        if self.database_identity is None:
            self.database_identity = file_identity(self.database)

    def check_database(self) -> None:
        """Raise AnnotatorDBError if the database file was deleted or replaced under the running server."""
        if file_identity(self.database) != self.database_identity:
            raise AnnotatorDBError(database_gone_message(self.database))

    @property
    def images(self) -> Dataset:
        """What people see: the pixels or original files (the model may read backbone features instead)."""
        return self.driver.engine.images

    @property
    def classes(self) -> list[str]:
        return self.dataset.classes

    @property
    def status(self):
        return self.driver.status

    def notify_engine(self) -> None:
        if self.worker is not None:
            self.worker.notify()


def annotator_state() -> AnnotatorState:
    """The current app's AnnotatorState (inside a request or an app context)."""
    return current_app.extensions["annotator"]
