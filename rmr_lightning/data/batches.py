"""The batch layouts the two stage modules consume; datamodules produce them."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class GraphBatch:
    """A batch of graphs with node states; PyG's flat layout (nodes of all graphs stacked)."""

    x: Tensor  # (N,) abstract input state x'
    y: Tensor  # (N,) target state y' = A(x')
    params: Tensor  # (G, P) global parameters of A per graph, in the algorithm's param_names order
    edge_index: Tensor  # (2, E) source -> target
    edge_weight: Tensor  # (E,) C_ij / deg_i: the random-walk operator's weights
    batch: Tensor  # (N,) graph of each node
    num_graphs: int


@dataclass
class ScanBatch:
    """A batch of subjects for the natural model (``rmr_lightning.natural``).

    Region r of the label map (1..R, 0 background) is node r-1 of the connectome.
    """

    image: Tensor  # (B, 1, X, Y, Z) float32, normalised; TorchIO's RAS voxel order
    labels: Tensor  # (B, 1, X, Y, Z) integer region labels in image space (uint8, int16 or int64)
    covariates: Tensor  # (B, C) float32, in the datamodule's ``covariate_names`` order
    target: Tensor  # (B, R, 2) float32: [baseline, follow-up] per region; NaN where unknown
    state: Tensor  # (B, R) float32 hidden abstract state (phantoms); NaN for real scans
    subject_ids: list[str]

    @property
    def batch_size(self) -> int:
        return self.image.shape[0]
