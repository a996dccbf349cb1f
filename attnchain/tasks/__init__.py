"""Tasks: evaluations of attention chains on the runner, with shared read-outs.

- :class:`Runner` (resumable, sharded with ``accelerate``, results in one long table
  ``item, method, weighting, metric, value``), :func:`summarise` and :func:`compare` (means and
  paired differences with bootstrap confidence intervals) and :func:`select`.
- :mod:`~attnchain.tasks.readouts`: row select, column select, column sum, bounce maps,
  TokenRank and metastable states, read at chosen target tokens.
- One module per task: :mod:`~attnchain.tasks.scene_saliency` (chapter 7),
  :mod:`~attnchain.tasks.same_object` (the same-object AUC of chapters 3 and 5),
  :mod:`~attnchain.tasks.concept_segmentation` (chapter 8, with
  :mod:`~attnchain.tasks.concept_chains` and :mod:`~attnchain.tasks.concept_scores`),
  :mod:`~attnchain.tasks.token_masking` (chapter 9), :mod:`~attnchain.tasks.sag` (chapter 10, with
  :mod:`~attnchain.tasks.sag_sampler` and :mod:`~attnchain.tasks.image_metrics`),
  :mod:`~attnchain.tasks.diffseg` and :mod:`~attnchain.tasks.diffseg_eval` (chapter 11); the
  locality analysis in :mod:`~attnchain.tasks.locality`.
"""
from . import concept_segmentation, locality, readouts, same_object, scene_saliency, token_masking
from . import diffseg, diffseg_eval
from ._runner import COLUMNS, Runner, compare, select, summarise

__all__ = ["COLUMNS", "Runner", "compare", "select", "summarise", "readouts", "locality",
           "same_object", "scene_saliency", "token_masking", "concept_segmentation", "diffseg",
           "diffseg_eval"]
