"""The mark every shard an hpcembed job writes carries in its schema's metadata, so that `--overwrite` removes only
files an hpcembed job wrote, never a user's own file that happens to be named like a shard."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from .. import __version__
from . import location

WRITTEN_BY = {b"hpcembed": __version__.encode()}


def written_by_hpcembed(path: str) -> bool:
    """Whether a shard-named file (a path or URL) carries hpcembed's mark (a user's own file, or one that cannot be
    read, does not)."""
    try:
        if str(path).endswith(".arrow"):
            with pa.memory_map(str(path)) as source:
                metadata = pa.ipc.open_file(source).schema.metadata
        else:
            metadata = pq.read_schema(location.open_arrow(str(path))).metadata
    except (OSError, pa.ArrowException):
        return False
    return bool(metadata) and b"hpcembed" in metadata
