"""Reading images, COCO-format datasets, training transforms, batching, and the embedded shapes dataset."""
from .coco_dataset import CocoDataset, decode_mask
from .loader import AspectRatioBatchSampler, Loader, build_loader, collate
from .synthetic import ShapesSplits, shapes_dataset, shapes_splits
from .transforms import Sample, hflip, resize, sample_scale

__all__ = ["CocoDataset", "decode_mask", "AspectRatioBatchSampler", "Loader", "build_loader", "collate",
           "ShapesSplits", "shapes_dataset", "shapes_splits", "Sample", "hflip", "resize", "sample_scale"]
