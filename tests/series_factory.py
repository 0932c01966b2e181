"""Generated DICOM series for tests: one phantom chest, slice after slice along z, with a tumour on known slices,
reconstructed with a "sharp" and a "smooth" kernel at the same table positions, and Pascal VOC boxes named by
SOPInstanceUID, as Lung-PET-CT-Dx lays them out.

Within a series only the tumour and a little per-slice noise differ; the lungs change size slowly along z. The
noise level of each slice is drawn at random, so a rule that reads global sharpness or noise ranks slices
by that, not by the tumour; the kernels differ exactly in sharpness.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from chestct.calibration import UNCALIBRATED

SIDE = 128
LESION_CENTER = (44, 60)  # (x, y): inside the left-hand lung field
LESION_RADIUS = 9
AXIAL = [1, 0, 0, 0, 1, 0]


@dataclass
class SeriesSpec:
    patient_id: str = "PHANTOM-1"
    slices: int = 16
    tumour_slices: tuple[int, ...] = (6, 7, 8, 9)
    spacing_mm: float = 5.0
    kernels: tuple[str, ...] = ("SHARP", "SMOOTH")
    seed: int = 0
    study_uid: str = field(default_factory=generate_uid)


def phantom_hu(index: int, spec: SeriesSpec, rng: np.random.Generator) -> np.ndarray:
    """One slice in Hounsfield units: soft-tissue body, two air-filled lungs, the tumour on its slices."""
    hu = np.full((SIDE, SIDE), -1000.0)
    cv2.ellipse(hu, (SIDE // 2, SIDE // 2), (56, 44), 0, 0, 360, 40.0, -1)
    lung_scale = 1.0 - 0.3 * abs(index - spec.slices / 2) / spec.slices  # bigger mid-chest
    for centre_x in (40, 88):
        cv2.ellipse(hu, (centre_x, 62), (int(18 * lung_scale), int(28 * lung_scale)), 0, 0, 360, -850.0, -1)
    if index in spec.tumour_slices:
        cv2.circle(hu, LESION_CENTER, LESION_RADIUS, 30.0, -1)
    noise = rng.uniform(40.0, 160.0)  # per-slice noise level: a sharpness rule reads this, not the tumour
    return hu + rng.normal(0.0, noise, hu.shape)


def reconstruct(hu: np.ndarray, kernel: str) -> np.ndarray:
    """The same slice under a sharp (unsharp mask) or a smooth (Gaussian) reconstruction kernel."""
    blurred = cv2.GaussianBlur(hu.astype(np.float32), (0, 0), 0.8)
    return hu + 1.5 * (hu - blurred) if kernel == "SHARP" else blurred.astype(np.float64)


def slice_dicom(hu: np.ndarray, *, patient_id: str, study_uid: str, series_uid: str, series_number: int,
                kernel: str, z: float | None, instance: int, orientation=AXIAL, sop_uid: str | None = None) -> bytes:
    """A CT Image Storage slice with the series tags (intercept -1024, signed 16 bit, like Lung-PET-CT-Dx)."""
    stored = np.clip(np.round(hu + 1024.0), -32768, 32767).astype("<i2")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality, ds.PatientID, ds.SeriesNumber, ds.InstanceNumber = "CT", patient_id, series_number, instance
    ds.ConvolutionKernel, ds.Manufacturer = kernel, "chestct phantoms"
    if z is not None:
        ds.ImagePositionPatient = [-160.0, -160.0, z]
    if orientation is not None:
        ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = [0.7, 0.7]
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
    ds.PixelData = stored.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def voc_xml(box: tuple[int, int, int, int], name: str = "A") -> str:
    x0, y0, x1, y1 = box
    return (f"<annotation><size><width>{SIDE}</width><height>{SIDE}</height><depth>1</depth></size>"
            f"<object><name>{name}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
            f"<ymax>{y1}</ymax></bndbox></object></annotation>")


def lesion_box() -> tuple[int, int, int, int]:
    (x, y), r = LESION_CENTER, LESION_RADIUS
    return x - r, y - r, x + r, y + r


@dataclass
class WrittenSeries:
    root: Path
    tumour_uids: dict[str, set[str]] = field(default_factory=dict)  # kernel -> SOPInstanceUIDs of tumour slices
    series_uids: dict[str, str] = field(default_factory=dict)  # kernel -> SeriesInstanceUID


def write_annotated_series(root: Path, spec: SeriesSpec | None = None, boxes_folder: str = "Annotation"
                           ) -> WrittenSeries:
    """The TCIA layout: <root>/<patient>/<study>/<n>-<kernel>/<i>.dcm, boxes under <root>/<boxes_folder>/."""
    spec = spec or SeriesSpec()
    rng = np.random.default_rng(spec.seed)
    hus = [phantom_hu(index, spec, rng) for index in range(spec.slices)]
    written = WrittenSeries(root)
    (root / boxes_folder / spec.patient_id).mkdir(parents=True, exist_ok=True)
    for number, kernel in enumerate(spec.kernels, start=2):
        series_uid = generate_uid()
        written.series_uids[kernel] = series_uid
        written.tumour_uids[kernel] = set()
        folder = root / spec.patient_id / "01-01-2020-NA-Chest" / f"{number}.000000-{kernel} 5mm"
        folder.mkdir(parents=True, exist_ok=True)
        for index, hu in enumerate(hus):
            sop_uid = generate_uid()
            z = -100.0 + index * spec.spacing_mm
            (folder / f"1-{index + 1:02d}.dcm").write_bytes(slice_dicom(
                reconstruct(hu, kernel), patient_id=spec.patient_id, study_uid=spec.study_uid,
                series_uid=series_uid, series_number=number, kernel=kernel, z=z, instance=index + 1, sop_uid=sop_uid))
            if index in spec.tumour_slices:
                written.tumour_uids[kernel].add(sop_uid)
                (root / boxes_folder / spec.patient_id / f"{sop_uid}.xml").write_text(voc_xml(lesion_box()))
    return written


class RulePredictor:
    """A stand-in for `chestct.serving.predictor.Predictor` whose "model" is a fixed rule on the decoded slice, so
    the panel's figures can be checked against what the rule must give. Decoding is the real one (DICOM window
    from the default serve params); the model input is the decoded slice itself."""

    format = "rule"
    sha256 = "rule"
    gradcam_available = False
    has_lesion_map = False
    threshold = 0.5
    calibration = UNCALIBRATED
    refuse_out_of_domain = False
    domain = None  # no feature distance: the first layer of the domain check alone

    def __init__(self, rule: str, params):
        from chestct.serving.predictor import DEFAULT_EXPORT_DIR

        self.rule = rule
        self.serve_params = params.serve
        self.preprocess_params = params.preprocess.model_copy(update={"image_size": SIDE, "crop": "none",
                                                                      "mask": "body"})
        self.export_dir = DEFAULT_EXPORT_DIR

    def decode(self, source, name=None) -> np.ndarray:
        from chestct.imaging.decode import decode_grayscale

        return decode_grayscale(source, name=name, dicom_window=self.serve_params.dicom_window)

    def prepare_decoded(self, gray: np.ndarray) -> np.ndarray:
        return gray[:, :, None]

    def prepare(self, source, name=None) -> np.ndarray:
        return self.prepare_decoded(self.decode(source, name))

    def decide(self, *args, **kwargs):
        """The real Predictor's decision at this threshold (batch scoring builds its rows with it)."""
        from chestct.serving.predictor import Predictor

        return Predictor.decide(self, *args, **kwargs)

    def inspect(self, source, name=None):
        """The real Predictor's decoding and domain check (batch scoring reads its files with it)."""
        from chestct.serving.predictor import Predictor

        return Predictor.inspect(self, source, name)

    def outputs(self, images: np.ndarray):
        from chestct.export.formats import ModelOutputs

        return ModelOutputs(self.probabilities(images), None, None)

    def __getattr__(self, name: str):
        """The real Predictor's domain-check methods (domain_distances, domain_reason, refusal), which read only
        `domain` and `refuse_out_of_domain`."""
        from chestct.serving.predictor import Predictor

        if name in ("domain_distances", "domain_reason", "refusal"):
            return getattr(Predictor, name).__get__(self)
        raise AttributeError(name)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        images = images[..., 0].astype(np.float64)
        if self.rule == "lesion":  # the mean grey level where the tumour grows, against the lung around it
            x, y = LESION_CENTER
            patch = images[:, y - 3:y + 4, x - 3:x + 4].mean(axis=(1, 2))
            return 1.0 / (1.0 + np.exp(-(patch - 110.0) / 10.0))
        # "sharpness": the variance of the Laplacian over the whole slice
        sharpness = np.array([cv2.Laplacian(image, cv2.CV_64F).var() for image in images])
        return 1.0 / (1.0 + np.exp(-(np.log(sharpness + 1e-6) - np.log(3500.0)) * 3.0))
