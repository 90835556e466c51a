"""Sample-quality metrics: feature extractors, torchmetrics FID/KID/IS adapters, reference-statistics cache."""

from sgm_lightning.evaluation.features import (
    IdentityFeatures,
    InceptionV3Features,
    InceptionWeightsNotFoundError,
    RandomProjectionFeatures,
    find_inception_weights,
    verify_weights,
)
from sgm_lightning.evaluation.fid import (
    load_reference_features,
    load_reference_statistics,
    make_fid_metric,
    make_is_metric,
    make_kid_metric,
    metric_key,
)
from sgm_lightning.evaluation.reference import ReferenceStats, default_cache_dir, reference_key, reference_statistics

__all__ = [
    "IdentityFeatures", "InceptionV3Features", "InceptionWeightsNotFoundError", "RandomProjectionFeatures",
    "find_inception_weights", "verify_weights", "load_reference_features", "load_reference_statistics",
    "make_fid_metric", "make_is_metric", "make_kid_metric", "metric_key", "ReferenceStats", "default_cache_dir",
    "reference_key", "reference_statistics",
]
