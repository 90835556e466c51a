"""The number of classes of a Hugging Face dataset's label column (``HFImageDataModule``)."""

from __future__ import annotations


def hf_num_classes(ds, key: str, where: str) -> int:
    """Classes of column ``key`` of the Hugging Face ``Dataset`` ``ds``: a ``ClassLabel``'s ``num_classes``,
    else ``max + 1`` of integer labels; a ValueError saying how to encode any other column (strings:
    Parquet files written by pandas, floats) into class ids. ``where`` names the dataset in the error."""
    import datasets

    feature = ds.features[key]
    if isinstance(feature, datasets.ClassLabel):
        return int(feature.num_classes)
    if isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
        return int(max(ds[key], default=-1)) + 1
    raise ValueError(
        f"the label column {key!r} of {where!r} holds {feature} values, not class ids: store it as a ClassLabel "
        f"(ds = ds.class_encode_column({key!r}) before to_parquet / save_to_disk), or name an integer column "
        f"with label_key=..."
    )
