"""``DetectionGraph``: a detector's own ``detect`` for one image, in the form ``torch.onnx.export`` traces.

Nothing is restated here: the backbone, FPN, RPN proposal selection, RoI heads (cascade refinement, HTC
fusion) and NMS run the model's code, whose steps switch to their traceable kernels while exporting
(``res2det.ops.onnx_ops``: NonMaxSuppression, RoiAlign). Pasting masks at the original image size is left
to the caller, as mmdeploy leaves it: the graph returns each detection's ``28 x 28`` probabilities, and
``res2det.inference.postprocess`` pastes them as ``predict`` does (so a graph never holds ``K x H x W`` maps).

Inputs (batch of one): ``image [1, 3, H, W]`` normalised and zero-padded; ``image_size [2]`` int64, the
unpadded ``(h, w)`` inside it. Outputs, by decreasing score, K <= ``max_per_img``: ``boxes [K, 4]`` (x1, y1,
x2, y2 in input pixels, clipped to ``image_size``), ``scores [K]``, ``labels [K]`` int64 and, for mask models,
``mask_probs [K, 28, 28]`` (each detection's own class, after the sigmoid).
"""
from __future__ import annotations

from torch import Tensor, nn

from ..errors import Res2DetError
from ..models.detectors.two_stage import TwoStageDetector

INPUT_NAMES = ("image", "image_size")


def check_exportable(model: nn.Module) -> None:
    """A clear error for the models the graph does not cover (one line, names what is missing)."""
    if not isinstance(model, TwoStageDetector):
        raise Res2DetError(f"ONNX export covers the two-stage and cascade detectors, not {type(model).__name__}")
    if model.conventions != "mmdet":
        raise Res2DetError("ONNX export of PaddleDetection-convention detectors is not implemented (their "
                           "proposal ranking, decoding and class-grouped NMS have no traceable variant); "
                           "export an mmdetection row")


class DetectionGraph(nn.Module):
    """``model.detect`` for one image with its size as a tensor input (see the module docstring)."""

    def __init__(self, model: TwoStageDetector):
        super().__init__()
        check_exportable(model)
        self.model = model
        self.with_mask = bool(model.roi_head.with_mask)

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("boxes", "scores", "labels") + (("mask_probs",) if self.with_mask else ())

    def forward(self, image: Tensor, image_size: Tensor) -> tuple[Tensor, ...]:
        (result,) = self.model.detect(image, [(image_size[0], image_size[1])], paste_masks=False)
        return tuple(result[k] for k in ("boxes", "scores", "labels", "mask_probs")[:len(self.output_names)])


__all__ = ["DetectionGraph", "check_exportable", "INPUT_NAMES"]
