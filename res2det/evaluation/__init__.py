"""COCO evaluation of detectors with pycocotools (box and mask AP, per-class AP, DDP-aware)."""
from .coco_eval import (STAT_NAMES, ClassAP, CocoEvaluation, coco_evaluate, format_per_class, per_class_ap,
                        to_coco_results, write_results_json)
from .evaluator import evaluate_model, gather_and_evaluate

__all__ = ["STAT_NAMES", "ClassAP", "CocoEvaluation", "coco_evaluate", "format_per_class", "per_class_ap",
           "to_coco_results", "write_results_json", "evaluate_model", "gather_and_evaluate"]
