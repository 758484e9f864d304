"""The HARD task file: selected few-shot tasks as indices into a pool that can be rebuilt.

Format ``interplab/fewshot-tasks``, version 1 (JSON, UTF-8)::

    {
      "format": "interplab/fewshot-tasks",
      "version": 1,
      "pool": {"id": "digit-pairs/mixed/novel?seed=0&per_class=80",   # fewshot.data.load(id) rebuilds it
               "n": 2880, "sha256": "<hash of the pool's images and labels>"},
      "selection": {"method": "fastdiffsel", "alpha": 200.0, "steps": 1, "extractor": "cnn", ...},
      "tasks": [{"classes": [c, ...],          # global class ids; task label = position
                 "shots": [k_1, ...],          # support examples per class
                 "support": [i, ...],          # pool indices, grouped by class in ``classes`` order
                 "query": [i, ...],            # pool indices, q per class
                 "accuracy": {"cnn/proto": 44.0, ...}}, ...]   # as measured when exported
    }

Readers must reject a ``format`` they do not know and a ``version`` newer than theirs. For
paper datasets the pool id names the dataset (e.g. "orbit") and indices follow its loader's
sorted file order.
"""
import hashlib
import json
from pathlib import Path

import numpy as np

from ..errors import BadParameter
from .tasks import Task

FORMAT = "interplab/fewshot-tasks"
VERSION = 1


def pool_hash(pool) -> str:
    """sha256 of a pool's images and labels: a reload must see the very same pixels (a pool of image
    files: their names and sizes, not their bytes, which would mean reading the whole dataset; a lazily
    decoded pool: its records' addresses)."""
    h = hashlib.sha256()
    if hasattr(pool, "x"):
        h.update(np.ascontiguousarray(pool.x).tobytes())
    elif pool.files:
        for f in pool.files:
            h.update(f"{Path(f).name}:{Path(f).stat().st_size};".encode())
    elif hasattr(pool.images, "fingerprint"):   # decoded on demand: the record addresses
        h.update(pool.images.fingerprint())
    else:
        for image in pool.images:
            h.update(np.ascontiguousarray(image).tobytes())
    h.update(np.ascontiguousarray(pool.y).tobytes())
    return h.hexdigest()


def save_tasks(path, tasks: list[Task], pool, selection: dict | None = None, accuracy: dict | None = None) -> Path:
    """Write ``tasks`` over ``pool``; ``accuracy`` maps a method name to per-task accuracies (T,)."""
    accuracy = accuracy or {}
    rows = []
    for i, t in enumerate(tasks):
        rows.append({"classes": list(t.classes), "shots": list(t.shots), "support": list(t.support),
                     "query": list(t.query), "accuracy": {k: round(float(v[i]), 4) for k, v in accuracy.items()}})
    doc = {"format": FORMAT, "version": VERSION,
           "pool": {"id": pool.id, "n": len(pool.y), "sha256": pool_hash(pool)},
           "selection": selection or {}, "tasks": rows}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)
    return path


def load_tasks(path, pool=None):
    """Read a task file. Returns (tasks, doc, pool): the pool is rebuilt from its id unless given,
    and must hash to the stored value. ``doc["tasks"][i]["accuracy"]`` holds the exported numbers."""
    doc = json.loads(Path(path).read_text())
    if doc.get("format") != FORMAT:
        raise BadParameter(f"{path} is not an {FORMAT} file (format={doc.get('format')!r})")
    if not isinstance(doc.get("version"), int) or doc["version"] > VERSION:
        raise BadParameter(f"{path} has version {doc.get('version')!r}; this interplab reads up to {VERSION}, "
                           "upgrade interplab")
    if pool is None:
        from .data import load
        pool = load(doc["pool"]["id"])
    if pool_hash(pool) != doc["pool"]["sha256"]:
        raise BadParameter(f"{path}: the rebuilt pool {doc['pool']['id']!r} differs from the exported one "
                           "(different data or rendering code); tasks would point at other images")
    tasks = [Task(tuple(r["classes"]), tuple(r["shots"]), tuple(r["support"]), tuple(r["query"]))
             for r in doc["tasks"]]
    return tasks, doc, pool
