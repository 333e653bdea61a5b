"""DK84 in FreeSurfer's numbering: label maps as FreeSurfer and FastSurfer write them, mapped to regions.

DK84 is exactly FreeSurfer's ``aparc+aseg``: the 34 Desikan-Killiany cortical regions per hemisphere
(``ctx-lh-*`` 1001-1035 and ``ctx-rh-*`` 2001-2035, without 1004/2004, the corpus callosum, which aparc
does not assign) and eight aseg structures per hemisphere (FreeSurferColorLUT.txt). FastSurfer's
``aparc.DKTatlas+aseg`` uses the same numbers for the DKT protocol (Klein & Tourville 2012), which drops
the banks of the superior temporal sulcus, the frontal pole and the temporal pole: those six regions
are absent from its label maps (their values are predicted without image evidence, as any absent region).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

#: Cortical DK regions in ``regions.csv`` order (alphabetical as FreeSurfer numbers them, then the three
#: added later) with FreeSurfer's name; label = 1000 (left) or 2000 (right) + the number.
CORTICAL = (
    ("Bankssts", "bankssts", 1),
    ("Caudalanteriorcingulate", "caudalanteriorcingulate", 2),
    ("Caudalmiddlefrontal", "caudalmiddlefrontal", 3),
    ("Cuneus", "cuneus", 5),
    ("Entorhinal", "entorhinal", 6),
    ("Fusiform", "fusiform", 7),
    ("Inferiorparietal", "inferiorparietal", 8),
    ("Inferiortemporal", "inferiortemporal", 9),
    ("Isthmuscingulate", "isthmuscingulate", 10),
    ("Lateraloccipital", "lateraloccipital", 11),
    ("Lateralorbitofrontal", "lateralorbitofrontal", 12),
    ("Lingual", "lingual", 13),
    ("Medialorbitofrontal", "medialorbitofrontal", 14),
    ("Middletemporal", "middletemporal", 15),
    ("Parahippocampal", "parahippocampal", 16),
    ("Paracentral", "paracentral", 17),
    ("Parsopercularis", "parsopercularis", 18),
    ("Parsorbitalis", "parsorbitalis", 19),
    ("Parstriangularis", "parstriangularis", 20),
    ("Pericalcarine", "pericalcarine", 21),
    ("Postcentral", "postcentral", 22),
    ("Posteriorcingulate", "posteriorcingulate", 23),
    ("Precentral", "precentral", 24),
    ("Precuneus", "precuneus", 25),
    ("Rostralanteriorcingulate", "rostralanteriorcingulate", 26),
    ("Rostralmiddlefrontal", "rostralmiddlefrontal", 27),
    ("Superiorfrontal", "superiorfrontal", 28),
    ("Superiorparietal", "superiorparietal", 29),
    ("Superiortemporal", "superiortemporal", 30),
    ("Supramarginal", "supramarginal", 31),
    ("Frontalpole", "frontalpole", 32),
    ("Temporalpole", "temporalpole", 33),
    ("Transversetemporal", "transversetemporal", 34),
    ("Insula", "insula", 35),
)
#: aseg structures of DK84: region stem, (left label, right label), aseg.stats names (FreeSurfer 7, then 6).
SUBCORTICAL = (
    ("Cerebellum_Cortex", (8, 47), ("Cerebellum-Cortex",)),
    ("Thalamus_Proper", (10, 49), ("Thalamus", "Thalamus-Proper")),
    ("Caudate", (11, 50), ("Caudate",)),
    ("Putamen", (12, 51), ("Putamen",)),
    ("Pallidum", (13, 52), ("Pallidum",)),
    ("Hippocampus", (17, 53), ("Hippocampus",)),
    ("Amygdala", (18, 54), ("Amygdala",)),
    ("Accumbens_area", (26, 58), ("Accumbens-area",)),
)
#: Cortical regions the DKT protocol (FastSurfer's ``aparc.DKTatlas+aseg``) does not label.
DKT_MISSING = ("Bankssts", "Frontalpole", "Temporalpole")
#: Label schemes a manifest's label maps may use (the ``label_scheme`` column or datamodule option).
LABEL_SCHEMES = ("dk84", "aparc+aseg", "aparc.DKTatlas+aseg")


def freesurfer_labels(region_names: list[str]) -> list[int]:
    """FreeSurfer label of each DK84 region name (``Cuneus_L`` -> 1005, ``Hippocampus_R`` -> 53)."""
    table = {}
    for stem, _, number in CORTICAL:
        table[f"{stem}_L"], table[f"{stem}_R"] = 1000 + number, 2000 + number
    for stem, (left, right), _ in SUBCORTICAL:
        table[f"{stem}_L"], table[f"{stem}_R"] = left, right
    unknown = [n for n in region_names if n not in table]
    if unknown:
        raise ValueError(
            f"regions {unknown[:5]} have no FreeSurfer label; FreeSurfer label schemes need DK84 region names"
        )
    return [table[n] for n in region_names]


def scheme_absent(scheme: str, region_names: list[str]) -> list[str]:
    """The regions a scheme never labels (FastSurfer's DKT atlas lacks six DK regions)."""
    if scheme != "aparc.DKTatlas+aseg":
        return []
    return [n for n in region_names if n.rsplit("_", 1)[0] in DKT_MISSING]


def label_lookup(scheme: str, region_names: list[str]) -> Tensor | None:
    """A table mapping the scheme's label values to region numbers 1..R (0 elsewhere); None for ``dk84``,
    whose label r already is region r. Index it with a label map: ``lookup[labels]``."""
    if scheme not in LABEL_SCHEMES:
        raise ValueError(f"label_scheme must be one of {LABEL_SCHEMES}, got {scheme!r}")
    if scheme == "dk84":
        return None
    labels = freesurfer_labels(region_names)
    absent = set(scheme_absent(scheme, region_names))
    lookup = np.zeros(max(labels) + 1, dtype=np.int64)
    for region, (name, label) in enumerate(zip(region_names, labels, strict=True), start=1):
        if name not in absent:
            lookup[label] = region
    return torch.from_numpy(lookup)


def relabel(labels: Tensor, lookup: Tensor | None) -> Tensor:
    """A label map in a FreeSurfer scheme as region numbers 1..R; labels outside DK84 become background."""
    if lookup is None:
        return labels
    labels = labels.long()
    inside = (labels >= 0) & (labels < len(lookup))
    return torch.where(inside, lookup[labels.clamp(0, len(lookup) - 1)], torch.zeros_like(labels))
