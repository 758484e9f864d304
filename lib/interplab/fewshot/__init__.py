"""Few-shot tasks and difficult-task selection (Chapter 4: FastDiffSel and Hard-Meta-Dataset++).

    data      digit-pair pools with annotated nuisances (tiny); paper dataset loaders
    tasks     Task, FixedSampler, MetaDatasetSampler, search_pool, check_task, collate, composition
    learners  ProtoNet, LinearHead, NearestNeighbour, accuracy, evaluate, summarise, mean_ci
    select    fastdiffsel, greedy, project_l1, project_box, select_tasks, select_timed, support_loss, tune_alpha
    export    save_tasks / load_tasks: the versioned hard-task file format
"""
from .export import FORMAT, VERSION, load_tasks, save_tasks
from .learners import LEARNERS, LinearHead, NearestNeighbour, ProtoNet, accuracy, evaluate, mean_ci, summarise
from .select import (Selection, fastdiffsel, greedy, loss_and_grad, project_box, project_l1, query_loss, select_tasks,
                     select_timed, support_loss, top_k, tune_alpha)
from .tasks import (Batch, FixedSampler, MetaDatasetSampler, Task, check_task, collate, composition, sample_tasks,
                    search_pool)

__all__ = ["Task", "FixedSampler", "MetaDatasetSampler", "sample_tasks", "search_pool", "check_task", "collate",
           "composition", "Batch", "ProtoNet", "LinearHead", "NearestNeighbour", "LEARNERS", "accuracy", "evaluate",
           "summarise", "mean_ci", "fastdiffsel", "greedy", "project_l1", "project_box", "query_loss", "loss_and_grad",
           "top_k", "select_tasks", "select_timed", "support_loss", "tune_alpha", "Selection", "save_tasks",
           "load_tasks", "FORMAT", "VERSION"]
