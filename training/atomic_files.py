"""Files that are never seen half-written: results JSONs that --resume builds on, cached reference statistics."""

import json
import os


def write_atomically(path: str, write) -> None:
    """`write(tmp)` writes beside `path`, then the file is renamed over it: a run killed while writing
    leaves the previous file whole, and a write that fails leaves no stray half-file."""
    tmp = f"{path}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomically(path: str, data, indent: int = 2) -> None:
    """The results that --resume keeps (an hour a row on a CPU) are never lost to a half-written file."""
    def dump(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=indent)
    write_atomically(path, dump)
