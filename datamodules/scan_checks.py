"""Checks of scan files: from headers first (cheap, every row), then of content (once, when a scan is cached).

Header checks catch what a damaged export looks like before anything is decoded: a NIfTI or MGH file
whose bytes (or gzip stream) are short of what its header promises (nibabel would read the missing
part as zeros), a DICOM folder with an unreadable, short or missing slice (SimpleITK would drop it
silently). Content checks catch what a header cannot show: NaN or infinite voxels, a blank (constant)
image, label values outside the scheme, and a scan with nothing left inside the brain after
preprocessing. Every check returns ``(what is wrong)`` sentences; callers add subject, column and file.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk
import torch
from pydicom.misc import is_dicom
from torch import Tensor

#: Largest difference (mm, or mm per voxel) tolerated between the affines of image and label map.
AFFINE_ATOL = 1e-3
#: A gap between neighbouring DICOM slices this many times the median spacing means a missing slice.
SLICE_GAP_FACTOR = 1.5
_GZIP_CHUNK = 1 << 20


@dataclass(frozen=True)
class Header:
    """What a file's header says: spatial shape, affine (4, 4) and channels; ``fingerprint`` changes with
    the file's bytes (size and modification time of every file read), so a cache keyed on it is never stale."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    channels: int
    fingerprint: str


# ------------------------------------------------------------------------------------ NIfTI and MGH


def _gzip_length(path: Path) -> int | None:
    """Decompressed length of a gzip file, or None when its stream ends early or is corrupt."""
    inflater, total = zlib.decompressobj(zlib.MAX_WBITS | 16), 0
    with open(path, "rb") as f:
        while chunk := f.read(_GZIP_CHUNK):
            while chunk:
                try:
                    total += len(inflater.decompress(chunk))
                except zlib.error:
                    return None
                chunk = inflater.unused_data  # a further gzip member (bgzip, concatenated files)
                if chunk:
                    inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
    return total if inflater.eof else None


def _gzip_isize(path: Path) -> int:
    """The uncompressed size the gzip trailer records (modulo 2^32; of the last member only)."""
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        return int.from_bytes(f.read(4), "little")


def _promised_bytes(image: nib.spatialimages.SpatialImage) -> tuple[int, bool]:
    """(bytes the header promises up to the end of the voxel data, whether more may follow it)."""
    data = int(np.prod(image.shape)) * image.get_data_dtype().itemsize
    offset = int(getattr(image.dataobj, "offset", 0))
    return offset + data, isinstance(image, nib.MGHImage)  # MGH: optional tags follow the voxels


def _size_problem(path: Path, promised: int, more_allowed: bool) -> str | None:
    """Whether the file (or its gzip stream) holds the bytes its header promises."""
    if path.name.endswith((".gz", ".mgz")):
        if _gzip_isize(path) == promised % 2**32:
            return None  # the trailer agrees: the usual case, read without decompressing
        actual = _gzip_length(path)
        if actual is None:
            return "gzip stream is cut short or corrupt (the file is truncated or damaged)"
        what = "decompressed size"
    else:
        actual, what = path.stat().st_size, "size"
    if actual < promised or (actual > promised and not more_allowed and what == "decompressed size"):
        return f"{what} is {actual} bytes but the header promises {promised}: the file is truncated or damaged"
    return None


def volume_header(path: Path) -> tuple[Header | None, list[str]]:
    """Header of a NIfTI or MGH file (nibabel reads only the header), checked against the file's size."""
    try:
        image = nib.load(path)
    except Exception as e:  # not an image nibabel knows, or a damaged header
        return None, [
            f"could not be read as an image ({type(e).__name__}: {_first_line(e).replace(str(path), 'the file')})"
        ]
    if not isinstance(image, nib.spatialimages.SpatialImage):
        return None, [f"is a {type(image).__name__}, not a volume"]
    shape = tuple(int(s) for s in image.shape)
    problems = []
    if len(shape) not in (3, 4) or min(shape) < 1:
        problems.append(f"has shape {shape}; expected a 3D volume")
    channels = shape[3] if len(shape) == 4 else 1
    if channels != 1:
        problems.append(f"has {channels} channels, expected 1")
    if not np.isfinite(image.affine).all() or abs(np.linalg.det(image.affine[:3, :3])) < 1e-9:
        problems.append("has a non-finite or singular affine in its header")
    files = sorted({Path(holder.filename) for holder in image.file_map.values() if holder.filename})
    data_file = Path(image.file_map["image"].filename or path) if "image" in image.file_map else path
    promised, more = _promised_bytes(image)
    if (why := _size_problem(data_file, promised, more)) is not None:
        problems.append(why)
    header = Header(shape[:3], np.asarray(image.affine, dtype=np.float64), channels, _fingerprint(files or [path]))
    return header, problems


# ------------------------------------------------------------------------------------------ DICOM


def dicom_files(path: Path) -> tuple[list[str], str | None]:
    """The DICOM files TorchIO would read for ``path`` (a series folder or one file), or why none."""
    if not path.is_dir():
        return ([str(path)] if is_dicom(path) else []), None
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
    if len(series) == 0:
        return [], "the folder holds no DICOM series"
    if len(series) > 1:  # TorchIO would silently read only the first one
        return [], f"the folder holds {len(series)} DICOM series; put each series in its own folder"
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0])), None


def _slice_problem(file: Path) -> tuple[float | None, str | None]:
    """(position along the slice normal in mm, or why the slice is damaged) of one DICOM file."""
    try:
        ds = pydicom.dcmread(file)
        pixels = ds.get("PixelData")
    except Exception as e:
        return None, f"slice {file.name} is not a readable DICOM file ({type(e).__name__})"
    if pixels is None:
        return None, f"slice {file.name} has no pixel data"
    if not ds.file_meta.get("TransferSyntaxUID", pydicom.uid.ExplicitVRLittleEndian).is_compressed:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        expected = (
            int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * frames * int(ds.BitsAllocated) // 8
        )
        if len(pixels) < expected:
            return (
                None,
                f"slice {file.name} holds {len(pixels)} pixel bytes, its header promises {expected} (truncated)",
            )
    orientation, position = ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient")
    if orientation is None or position is None:
        return None, None
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    return float(np.dot(normal, np.asarray(position, float))), None


def dicom_problems(path: Path, files: list[str]) -> list[str]:
    """Damaged DICOM series: unreadable or short slices, files left out of the series, a missing slice."""
    problems = []
    if path.is_dir():
        readable = {str(f) for f in files}
        strays = [
            f for f in sorted(path.iterdir()) if f.is_file() and not f.name.startswith(".") and str(f) not in readable
        ]
        problems += [
            f"file {f.name} in the series folder is not part of the series (unreadable or damaged slice)"
            for f in strays
        ]
    positions = []
    for file in files:
        position, why = _slice_problem(Path(file))
        if why:
            problems.append(why)
        elif position is not None:
            positions.append(position)
    if len(positions) >= 3:
        steps = np.diff(np.sort(positions))
        typical = float(np.median(steps))
        gaps = steps[steps > SLICE_GAP_FACTOR * typical] if typical > 0 else []
        if len(gaps):
            problems.append(
                f"{len(gaps)} gap(s) of up to {float(max(gaps)):.2f} mm between slices "
                f"spaced {typical:.2f} mm: a slice is missing"
            )
    return problems


# ------------------------------------------------------------------------------------------ shared


def same_space(image: Header, labels: Header) -> str | None:
    """Image and label map must share the voxel grid: same spatial shape, affines within tolerance."""
    if image.shape != labels.shape:
        return f"spatial shape {labels.shape} differs from the image's {image.shape}"
    gap = float(np.abs(image.affine - labels.affine).max())
    if gap > AFFINE_ATOL:
        return (
            f"affine differs from the image's by up to {gap:.3g} mm (tolerance {AFFINE_ATOL}); "
            "the label map must be in the image's voxel space"
        )
    return None


def _fingerprint(files: list[Path | str]) -> str:
    """Names, sizes and modification times of the files read: changes whenever their bytes may have."""
    parts = []
    for file in sorted(str(f) for f in files):
        stat = os.stat(file)
        parts.append(f"{os.path.abspath(file)}|{stat.st_size}|{stat.st_mtime_ns}")
    return "\n".join(parts)


def dicom_fingerprint(files: list[str]) -> str:
    return _fingerprint(files)


def _first_line(error: BaseException, limit: int = 160) -> str:
    lines = str(error).strip().splitlines()
    return (lines[0].split(". ")[0] if lines else "")[:limit]


# ------------------------------------------------------------------------------------------ content


def image_content(data: Tensor) -> list[str]:
    """A raw image must be finite and not constant (a blank export, or a failed conversion)."""
    if data.is_floating_point() and not bool(torch.isfinite(data).all()):
        return ["contains NaN or infinite intensities"]
    low, high = data.min(), data.max()
    if bool(low == high):
        return [f"is constant (every voxel {float(low):g}): a blank or failed export"]
    return []


def label_content(data: Tensor, num_regions: int, scheme: str) -> list[str]:
    """Label values: integers, and for ``dk84`` region numbers 0..R."""
    if data.is_floating_point() and not bool((data == data.round()).all()):  # NaN fails too
        return ["has non-integer values; a label map holds region numbers"]
    low, high = int(data.min()), int(data.max())
    if low < 0:
        return [f"has negative label {low}"]
    if scheme == "dk84" and high > num_regions:
        return [
            f"has label {high} > R = {num_regions} (one region per target column); allowed: 0..{num_regions} "
            "(FreeSurfer label maps: set label_scheme to aparc+aseg)"
        ]
    return []


def brain_content(image: Tensor, regions: Tensor, when: str = "") -> list[str]:
    """Region voxels must exist and the image must not be constant over them (a scan empty where the label
    map puts the brain, or finite voxels lost by preprocessing); ``when`` says at which stage."""
    if not bool((regions > 0).any()):
        return [f"has no region voxels{when} (all background after mapping its labels to regions)"]
    if not bool(torch.isfinite(image).all()):
        return [f"has NaN or infinite intensities{when}"]
    inside = image[regions.expand_as(image) > 0].double()
    if inside.numel() < 2 or math.isclose(float(inside.std()), 0.0, abs_tol=1e-12):
        return [f"is constant over the brain regions{when}: empty where the label map puts the brain"]
    return []
