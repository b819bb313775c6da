"""Data in: one reader per source format over one row pipeline (readers/), the data model and splitting
(sources.py), loading a run's splits (loading.py), the prepared cache (cache.py), patient-level folds
(splits.py), image decoding (imageio.py), tensors and augmentation (transforms.py), and the
Dataset/DataLoader that skips unreadable files (dataset.py)."""

from medsight.data.cache import CacheError, open_cache, prepare_cache
from medsight.data.dataset import ImageDataset, make_loader
from medsight.data.imageio import IMAGE_EXTS, ImageReadError, ImageTooLargeError, read_image, read_image_bytes
from medsight.data.loading import load_data, load_eval_data
from medsight.data.sources import (DEFAULT_CLASSES, ROTATION_CLASSES, SPLITS, DataBundle, DataError, SplitData,
                                   label_counts, label_policy, rotation_pretext)
from medsight.data.transforms import Clahe, array_to_tensor, make_transform, to_three_channels

__all__ = ["CacheError", "open_cache", "prepare_cache", "ImageDataset", "make_loader", "IMAGE_EXTS", "ImageReadError",
           "ImageTooLargeError", "read_image", "read_image_bytes", "label_counts", "label_policy",
           "DEFAULT_CLASSES", "ROTATION_CLASSES", "SPLITS", "DataBundle", "DataError", "SplitData", "load_data",
           "load_eval_data", "rotation_pretext", "Clahe", "array_to_tensor", "make_transform", "to_three_channels"]
