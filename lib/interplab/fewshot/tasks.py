"""Few-shot tasks and the samplers that draw them from a labelled pool.

A task is N classes, a support set with k_j examples of class j and a query set with q
examples per class, all as indices into one pool (``Pool.y`` gives their labels). The task
label of an example is the position of its class in ``Task.classes``.

    FixedSampler(way, shot, query)       N-way k-shot tasks
    MetaDatasetSampler(...)              Meta-Dataset's variable-way variable-shot sampler
                                         (Triantafillou et al. 2020, Sec. 3.2), its caps scaled
                                         to small pools
    search_pool(task, y, cap, allowed)   per class: its examples minus the query set (P = D' - Q),
                                         optionally among allowed ones and a seeded subset (HARD-MD)
    check_task(task, y)                  the way/shot/membership/disjointness constraints
    collate(tasks, features, y)          padded tensors for learners batched over tasks
    composition(tasks, flag)             support vs query share of an annotated property
"""
import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import BadParameter


@dataclass(frozen=True)
class Task:
    """classes: (N,) global class ids; shots: (N,) k_j; support / query: pool indices grouped by class."""
    classes: tuple
    shots: tuple
    support: tuple
    query: tuple

    @property
    def way(self) -> int:
        return len(self.classes)

    @property
    def n_query(self) -> int:
        """Query examples per class (q_j = q for every class, as in Meta-Dataset)."""
        return len(self.query) // self.way

    def with_support(self, support) -> "Task":
        return Task(self.classes, self.shots, tuple(int(i) for i in support), self.query)


def _task(classes, shots, support, query) -> Task:
    return Task(tuple(int(c) for c in classes), tuple(int(k) for k in shots),
                tuple(int(i) for i in support), tuple(int(i) for i in query))


class FixedSampler:
    """N-way k-shot tasks with q queries per class, classes and examples uniformly at random."""

    def __init__(self, way: int = 5, shot: int = 5, query: int = 10):
        if min(way, shot, query) < 1:
            raise BadParameter(f"way={way}, shot={shot}, query={query} must all be >= 1")
        self.way, self.shot, self.query = way, shot, query

    def sample(self, y: np.ndarray, rng: np.random.Generator, query_from: np.ndarray | None = None,
               support_from: np.ndarray | None = None, domain: np.ndarray | None = None) -> Task:
        """query_from / support_from (n,) bool: draw queries / support only among these examples (e.g. front
        views as queries, Fig 4.5; ORBIT's target and context videos, ``data.orbit_protocol``); by default the
        support may come from any other example of the class. domain (n,) ints: the task's classes share one
        value (ORBIT: one user's objects), drawn uniformly among the values with ``way`` classes that can
        fill a task."""
        ok = np.ones(len(y), bool) if query_from is None else np.asarray(query_from, bool)
        ok_s = np.ones(len(y), bool) if support_from is None else np.asarray(support_from, bool)
        candidates = np.unique(y)
        if domain is not None:
            # per class (counts in one pass over the pool): enough queries, and enough support left whichever
            # queries are drawn; a class's domain is that of its first example
            _, first, inv = np.unique(y, return_index=True, return_inverse=True)
            count = lambda mask: np.bincount(inv, weights=mask, minlength=len(candidates))  # noqa: E731
            spare = count(ok_s & ~ok) + np.maximum(0, count(ok_s & ok) - self.query)
            usable = (count(ok) >= self.query) & (spare >= self.shot)
            by = {}
            for c, d in zip(candidates[usable], np.asarray(domain)[first[usable]]):
                by.setdefault(int(d), []).append(c)
            eligible = sorted(d for d, cs in by.items() if len(cs) >= self.way)
            if not eligible:
                raise BadParameter(f"no domain has {self.way} classes with {self.query} queries and {self.shot} "
                                   "support examples each")
            candidates = np.array(by[eligible[rng.integers(len(eligible))]])
        classes = rng.choice(candidates, size=self.way, replace=False)
        support, query = [], []
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            q = idx[ok[idx]][:self.query]
            rest = np.setdiff1d(idx, q, assume_unique=True)
            rest = rest[ok_s[rest]]
            if len(q) < self.query or len(rest) < self.shot:
                raise BadParameter(f"class {c} has {len(idx)} examples ({int(ok[idx].sum())} allowed as queries, "
                                   f"{len(rest)} as support); {self.shot}-shot with {self.query} queries needs more")
            query += list(q)
            support += list(rng.permutation(rest)[:self.shot])
        return _task(classes, [self.shot] * self.way, support, query)


class MetaDatasetSampler:
    """Meta-Dataset's default test sampler: variable way, variable (imbalanced) shots.

    way N ~ U{min_way .. min(max_way, #classes)}; q = min(max_query, floor(min_c |c| / 2));
    support budget |S| = min(max_support, sum_c ceil(beta * min(max_shot, |c| - q))), beta ~ U(0, 1];
    shots k_c = min(floor(R_c (|S| - N)) + 1, |c| - q) with R_c proportional to exp(a_c) |c|,
    a_c ~ U(log 0.5, log 2). The paper's caps (50 ways, 500 support, 100 shots, 10 queries) are
    the defaults; ``max_way`` etc. shrink them for small pools.
    """

    def __init__(self, min_way=5, max_way=50, max_support=500, max_shot=100, max_query=10):
        self.min_way, self.max_way = min_way, max_way
        self.max_support, self.max_shot, self.max_query = max_support, max_shot, max_query

    def sample(self, y: np.ndarray, rng: np.random.Generator) -> Task:
        all_classes = np.unique(y)
        hi = min(self.max_way, len(all_classes))
        if hi < self.min_way:
            raise BadParameter(f"the pool has {len(all_classes)} classes; min_way={self.min_way}")
        way = int(rng.integers(self.min_way, hi + 1))
        classes = rng.choice(all_classes, size=way, replace=False)
        members = [rng.permutation(np.flatnonzero(y == c)) for c in classes]
        sizes = np.array([len(m) for m in members])
        q = min(self.max_query, int(sizes.min()) // 2)
        if q < 1:
            raise BadParameter("a class has fewer than 2 examples; Meta-Dataset tasks need 1 query + 1 shot")
        beta = 1.0 - rng.random()  # U(0, 1]
        budget = min(self.max_support, int(sum(math.ceil(beta * min(self.max_shot, s - q)) for s in sizes)))
        budget = max(budget, way)  # at least one shot per class
        a = rng.uniform(np.log(0.5), np.log(2.0), size=way)
        ratio = np.exp(a) * sizes / np.sum(np.exp(a) * sizes)
        shots = np.minimum(np.floor(ratio * (budget - way)).astype(int) + 1, sizes - q)
        query = [i for m in members for i in m[:q]]
        support = [i for m, k in zip(members, shots) for i in m[q:q + k]]
        return _task(classes, shots, support, query)


def sample_tasks(sampler, y: np.ndarray, n: int, seed: int, **kw) -> list[Task]:
    """``n`` tasks from one seeded stream (``kw`` reaches ``sampler.sample``)."""
    rng = np.random.default_rng(seed)
    return [sampler.sample(y, rng, **kw) for _ in range(n)]


def search_pool(task: Task, y: np.ndarray, cap: int | None = None, seed: int = 0,
                allowed: np.ndarray | None = None) -> list[np.ndarray]:
    """Per class j: the pool P_j = (examples of class j) - query, sorted, query never inside.

    allowed (n,) bool: only these examples may be searched (ORBIT: frames of the context videos, so
    no support frame shares a video with a query; ``data.orbit_protocol``).
    cap: keep at most max(cap - q, k_j) examples of each P_j (q queries and k_j shots per class), a
    subset drawn from ``seed`` and the task's query set, so the same task always gets the same pool. The
    HARD-MD release shuffles each class per task and searches images [q:cap] of it (``data.md_pool_cap``).
    """
    query = np.asarray(task.query)
    member = (lambda c: y == c) if allowed is None else (lambda c: (y == c) & np.asarray(allowed, bool))
    pools = [np.setdiff1d(np.flatnonzero(member(c)), query) for c in task.classes]
    if cap is None:
        return pools
    key = zlib.crc32(query.astype(np.int64).tobytes())
    out = []
    for c, k, p in zip(task.classes, task.shots, pools):
        keep = max(cap - task.n_query, k)
        if len(p) > keep:
            p = np.sort(np.random.default_rng([seed, key, int(c)]).choice(p, keep, replace=False))
        out.append(p)
    return out


def check_task(task: Task, y: np.ndarray) -> list[str]:
    """Every violated constraint as a sentence; empty when the task is valid."""
    problems = []
    s, q = np.asarray(task.support), np.asarray(task.query)
    if len(set(task.classes)) != task.way:
        problems.append("repeated classes")
    if len(np.unique(s)) != len(s):
        problems.append("repeated support examples")
    if np.intersect1d(s, q).size:
        problems.append(f"{np.intersect1d(s, q).size} query examples inside the support set")
    if not np.isin(y[s], task.classes).all():
        problems.append("support examples from classes outside the task")
    for c, k in zip(task.classes, task.shots):
        got = int(np.sum(y[s] == c))
        if got != k:
            problems.append(f"class {c}: {got} support examples, expected {k}")
        if np.sum(y[q] == c) != task.n_query:
            problems.append(f"class {c}: {int(np.sum(y[q] == c))} queries, expected {task.n_query}")
    return problems


@dataclass
class Batch:
    """Tasks padded to common sizes (T tasks, N_max ways, S_max support, Q_max queries, d features).

    s_x (T, S, d), s_y (T, S) task labels, s_m (T, S) valid; q_x, q_y, q_m likewise (T, Q, ...);
    c_m (T, N) which class slots are real.
    """
    s_x: torch.Tensor
    s_y: torch.Tensor
    s_m: torch.Tensor
    q_x: torch.Tensor
    q_y: torch.Tensor
    q_m: torch.Tensor
    c_m: torch.Tensor


def _pad(rows, width, fill, dtype):
    out = torch.full((len(rows), width), fill, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(np.asarray(r), dtype=dtype)
    return out


def collate(tasks: list[Task], features: torch.Tensor, y: np.ndarray) -> Batch:
    """Gather features (n, d) for the tasks into a padded ``Batch``."""
    def side(get):
        idx = [np.asarray(get(t), dtype=np.int64) for t in tasks]
        lab = []
        for t, i in zip(tasks, idx):
            lut = np.zeros(int(y.max()) + 1, dtype=np.int64)
            lut[list(t.classes)] = np.arange(t.way)   # global class id -> task label
            lab.append(lut[y[i]])
        width = max(len(i) for i in idx)
        ii, mm = _pad(idx, width, 0, torch.long), _pad([np.ones(len(i)) for i in idx], width, 0, torch.bool)
        return features[ii], _pad(lab, width, 0, torch.long), mm
    s_x, s_y, s_m = side(lambda t: t.support)
    q_x, q_y, q_m = side(lambda t: t.query)
    c_m = _pad([np.ones(t.way) for t in tasks], max(t.way for t in tasks), 0, torch.bool)
    return Batch(s_x, s_y, s_m, q_x, q_y, q_m, c_m)


def composition(tasks: list[Task], flag: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Share of support and of query examples carrying a property (Fig 4.5): flag (n,) bool ->
    (support share (T,), query share (T,))."""
    s = np.array([flag[list(t.support)].mean() for t in tasks])
    q = np.array([flag[list(t.query)].mean() for t in tasks])
    return s, q
