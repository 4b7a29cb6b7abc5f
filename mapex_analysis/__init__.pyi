# The public API (type checkers and IDEs read this; mapex_analysis/__init__.py loads it lazily).
from .checkpoint import load_model as load_model
from .checkpoint import save_model as save_model
from .eval.features import extract_features as extract_features
from .eval.finetune import finetune as finetune
from .eval.metrics import retention as retention
from .eval.probes import knn_probe as knn_probe
from .eval.probes import linear_probe as linear_probe
from .factory import create_model as create_model
from .measure.attribution import band_integrated_gradients as band_integrated_gradients
from .measure.attribution import modality_ablation as modality_ablation
from .measure.latency import measure_latency as measure_latency
from .measure.macs import count_macs as count_macs
from .measure.params import count_params as count_params
from .measure.redundancy import redundancy_metrics as redundancy_metrics
from .measure.specialization import specialization_metrics as specialization_metrics
from .models.registry import list_models as list_models
from .models.registry import register_model as register_model
from .ops.prune import prune_experts as prune_experts
from .ops.slim import slim_width as slim_width
from .options import SLIM_WIDTHS as SLIM_WIDTHS

__version__: str
