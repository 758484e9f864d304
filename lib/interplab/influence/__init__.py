"""Influence functions (Chapter 3): first- and second-order group influence, and the tools to
judge them against retraining.

    objective  Objective: flat-parameter loss, per-sample gradients, HVPs, Hessian; top_eigenvalue
    solvers    (H + damping I)^-1 b: CholeskySolver, conjugate_gradient, lissa
    functions  predictions: individual_influence, loo_effects, group_effects (1st/2nd order),
               group_effects_full, group_param_changes, select_group
    retrain    the truth: train -> Optimum, retrain / retrain_without (batched), loss_changes,
               sgd / adam budgets, loo_study / group_study
    metrics    pearson, spearman, mean_abs_error, relative_error
"""
from .functions import (group_effects, group_effects_full, group_mask, group_param_changes, individual_influence,
                        loo_effects, loo_param_changes, project_capped_simplex, select_group)
from .metrics import mean_abs_error, pearson, relative_error, spearman
from .objective import Objective, top_eigenvalue
from .retrain import (FitResult, Optimum, adam, adam_train_mode, fit, group_study, loo_study, loss_changes, positive_definite_solver,
                      retrain, retrain_without, sgd, train)
from .solvers import CholeskySolver, LissaDiverged, NotPositiveDefinite, conjugate_gradient, lissa

__all__ = ["Objective", "top_eigenvalue",
           "CholeskySolver", "conjugate_gradient", "lissa", "LissaDiverged", "NotPositiveDefinite",
           "group_mask", "individual_influence", "loo_effects", "loo_param_changes", "group_effects",
           "group_effects_full", "group_param_changes", "select_group", "project_capped_simplex",
           "train", "Optimum", "fit", "FitResult", "retrain", "retrain_without", "loss_changes", "sgd", "adam",
           "adam_train_mode",
           "positive_definite_solver", "loo_study", "group_study",
           "pearson", "spearman", "mean_abs_error", "relative_error"]
