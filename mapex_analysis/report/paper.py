"""The MAPEX paper's own tables (Hanna, Scheibenreif, Borth, arXiv 2507.07527), shown next to
the study's seed-style tables as a reference.

They are real-data numbers (ben-ge-8k land cover, SEN12-FLOOD, a wildfire set; ViT-B/L scale
models of 90-310 M parameters), accuracy / mIoU in %: what the SynthEO numbers of a study
are *not* directly comparable with, but whose pattern (per-modality ordering, FS vs k-NN vs
fine-tune, MAPEX vs optical-only pretraining) a reader can hold them against.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PAPER_ROUTERS", "PAPER_TABLES", "PaperTable"]


@dataclass(frozen=True)
class PaperTable:
    """One table of the paper.

    Attributes:
        title: What the paper evaluates (data set, metric).
        columns: Column labels, e.g. ``("FS", "SatMAE k-NN", ...)``.
        params: The models' parameter counts as the paper gives them, per column.
        rows: Modality -> one value (%) per column.
    """

    title: str
    columns: tuple[str, ...]
    params: tuple[str, ...]
    rows: dict[str, tuple[float, ...]]


_CLS = ("FS", "SatMAE k-NN", "SatMAE FT", "Scale-MAE k-NN", "Scale-MAE FT", "MAPEX k-NN",
        "MAPEX FT")  # fmt: skip
_CLS_PARAMS = ("130M", "90M", "90M", "310M", "310M", "130M", "130M")

#: SynthEO task -> the paper's table for that task.
PAPER_TABLES: dict[str, PaperTable] = {
    "landcover": PaperTable(
        "land cover classification, ben-ge-8k, accuracy %",
        _CLS,
        _CLS_PARAMS,
        {
            "rgb": (71.2, 64.5, 70.8, 75.1, 79.9, 67.2, 75.6),
            "red_edge": (73.3, 65.5, 69.7, 74.7, 80.3, 66.7, 77.8),
            "swir": (76.5, 68.3, 74.5, 76.2, 83.7, 72.4, 79.8),
            "nir": (56.1, 50.0, 56.9, 49.9, 57.2, 56.8, 59.4),
            "sar": (69.7, 62.2, 67.2, 65.3, 73.1, 66.1, 73.6),
            "ele": (51.8, 46.5, 47.1, 46.6, 51.4, 48.2, 58.8),
        },
    ),
    "flood": PaperTable(
        "flood detection (SAR), accuracy %",
        _CLS,
        _CLS_PARAMS,
        {"sar": (78.1, 77.4, 80.3, 83.0, 82.6, 80.1, 83.2)},
    ),
    "wildfire": PaperTable(
        "wildfire detection (SWIR), accuracy %",
        _CLS,
        _CLS_PARAMS,
        {"swir": (84.7, 84.2, 88.6, 86.6, 90.8, 87.3, 90.5)},
    ),
    "segmentation": PaperTable(
        "land cover segmentation (RGB), mIoU %",
        ("U-Net", "SatMAE (ViT-B)", "MAPEX"),
        ("", "90M", "130M"),
        {"rgb": (56.3, 53.1, 56.9)},
    ),
}

#: The paper's router ablation (land cover, k-NN accuracy %): modality -> (deterministic,
#: positional embedding, modality-based).
PAPER_ROUTERS: dict[str, tuple[float, float, float]] = {
    "rgb": (63.5, 63.1, 67.2),
    "red_edge": (63.2, 64.9, 66.7),
    "swir": (68.7, 67.9, 72.4),
    "nir": (51.6, 55.9, 56.8),
    "sar": (62.2, 65.3, 66.1),
    "ele": (46.0, 48.3, 48.2),
}
