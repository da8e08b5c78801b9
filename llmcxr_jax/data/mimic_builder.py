"""TFDS builders `mimic_cxr_llmcxr` (configs stage1/stage2) and `mimic_cxr_vqa_llmcxr`, written as ArrayRecord.

Build (no TensorFlow needed; nothing is downloaded, the files come from `manual_dir`, see mimic_files.py):

    builder = MimicCxrLlmcxr(config="stage1", data_dir=DATA)   # ArrayRecord by default (tfds_local.py)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=MANUAL))
    train = builder.as_data_source("train")      # or tfds.data_source("mimic_cxr_llmcxr/stage1", data_dir=DATA)

Other settings (codes path, selection file, grid, expected VQ-GAN) need a config of your own with another name,
e.g. `MimicCxrConfig(name="stage2_mycodes", stage=2, codes_path=...)`; TFDS refuses custom configs named like
the predefined ones. Splits: `train`, and `validation` = MIMIC's validate ∪ test (the original's eval set).
Records keep the original's order (sorted dicom_id); Text features come back as bytes. `info.metadata` holds
`vqgan` (fingerprint, grid, codebook size, recipe: a training run refuses a mismatch with
`mimic_codes.require_vqgan`), `stage`, `selection` (how stage-2 images were chosen) and `counts` per split (kept
and skipped by reason); `builder.build_counts` is the same dict right after a build.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from llmcxr_jax.data import mimic_codes, mimic_files
from llmcxr_jax.data.mimic_records import plan_split
from llmcxr_jax.data.tfds_local import LocalFilesBuilder
from llmcxr_jax.data.vqa import merge_onto_images, read_vqa_dir

_HOMEPAGE = "https://physionet.org/content/mimic-cxr-jpg/2.0.0/"
_CITATION = """@article{lee2023llmcxr, title={LLM-CXR: Instruction-Finetuned LLM for CXR Image Understanding and
Generation}, author={Lee, Suhyeon and Kim, Won Jun and Chang, Jinho and Ye, Jong Chul}, journal={arXiv preprint
arXiv:2305.11490}, year={2023}}"""
MANUAL_INSTRUCTIONS = f"""\
MIMIC-CXR is credentialed: get access on PhysioNet, then put into the manual directory
{chr(10).join(f'  {name}: {where}' for name, where in mimic_files.WHERE.items())}
  codes: {mimic_codes.WHERE}
  optional {mimic_files.SELECTION_PICKLE}: from the LLM-CXR repository (hyn2028/llm-cxr, data/mimic-cxr-jpg/); without
    it stage 2 reconstructs the selection from the metadata CSV (mimic_files.reconstruct_selection)
  optional {mimic_files.VQA_DIR}/ (VQA builder only): the original's VQA files, never released
{mimic_files.CONVERT_SELECTION}"""


@dataclasses.dataclass(eq=False)
class MimicCxrConfig(tfds.core.BuilderConfig):
    """Stage and inputs of a MIMIC build; paths default to the manual directory's layout (mimic_files.py).

    `selection_path`: stage 2 (and VQA) keep only its dicom_ids; None uses the manual directory's file if there,
    else the reconstruction. `expected_vqgan_fingerprint`: refuse codes of any other VQ-GAN (at build time).
    """

    stage: int = 1
    codes_path: str | None = None
    selection_path: str | None = None
    vqa_dir: str | None = None
    grid: tuple[int, int] = (16, 16)
    num_codes: int = 1024
    expected_vqgan_fingerprint: str | None = None


@dataclasses.dataclass(frozen=True)
class _Inputs:
    rows: list[mimic_files.ImageRow]
    metadata: dict[str, mimic_files.ImageMeta]
    codes: mimic_codes.Codes


def _read_inputs(manual_dir: Path, config: MimicCxrConfig) -> _Inputs:
    """Check the manual directory, read both CSVs and the codes, and enforce the expected VQ-GAN."""
    # Absolute, so that `require_files` (which joins relative names onto manual_dir) checks the path that is read.
    codes_path = Path(config.codes_path) if config.codes_path else mimic_codes.default_codes_path(manual_dir)
    codes_path = codes_path.absolute()
    mimic_files.require_files(manual_dir, {**mimic_files.WHERE, str(codes_path): mimic_codes.WHERE})
    codes = mimic_codes.load_codes(codes_path, tuple(config.grid), config.num_codes)
    if config.expected_vqgan_fingerprint is not None:
        mimic_codes.require_vqgan(mimic_codes.vqgan_metadata(codes), str(codes_path),
                                  fingerprint=config.expected_vqgan_fingerprint)
    rows = mimic_files.read_split_csv(manual_dir / mimic_files.SPLIT_CSV)
    metadata = mimic_files.read_metadata_csv(manual_dir / mimic_files.METADATA_CSV)
    if missing := [r.dicom_id for r in rows if r.dicom_id not in metadata]:  # no view: stage 2 would drop them
        raise mimic_files.MimicFileError(
            f"{manual_dir / mimic_files.METADATA_CSV}: no line for {len(missing)} of the {len(rows)} images of "
            f"{mimic_files.SPLIT_CSV}, e.g. {missing[:3]}; MIMIC-CXR-JPG's metadata CSV covers every image")
    return _Inputs(rows, metadata, codes)


def _selection(manual_dir: Path, config: MimicCxrConfig, inputs: _Inputs) -> tuple[frozenset[str], str]:
    """The stage-2 dicom_ids and a note of where they came from (the pickle, or the reconstruction)."""
    path = Path(config.selection_path) if config.selection_path else manual_dir / mimic_files.SELECTION_PICKLE
    if config.selection_path or path.exists():
        return mimic_files.load_selection(path), f"file {path}"
    if others := sorted(p.name for p in manual_dir.glob("*selected*pa-ap*.pickle")):
        raise mimic_files.MimicFileError(
            f"{manual_dir}: {', '.join(others)} is not {mimic_files.SELECTION_PICKLE} (the original's spelling), "
            "which stage 2 reads when present; rename it, or set the builder config's selection_path")
    return (mimic_files.reconstruct_selection(inputs.rows, inputs.metadata,
                                              manual_dir / mimic_files.METADATA_CSV),
            "reconstructed: PA/AP images of each subject's earliest PA/AP study (StudyDate, StudyTime)")


def _id_features() -> dict:
    return {"dicom_id": tfds.features.Text(), "subject_id": tfds.features.Text(), "study_id": tfds.features.Text()}


def _codes_feature(config: MimicCxrConfig) -> tfds.features.Tensor:
    return tfds.features.Tensor(shape=(config.grid[0] * config.grid[1],), dtype=np.int16)


class _MimicBuilderBase(LocalFilesBuilder, skip_registration=True):
    """What both MIMIC builders share: manual files, codes, selection, metadata."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_INSTRUCTIONS
    build_counts: dict | None = None

    def _dataset_info(self, features: dict, description: str) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=description,
                                     features=tfds.features.FeaturesDict(features), homepage=_HOMEPAGE,
                                     citation=_CITATION, metadata=tfds.core.MetadataDict(), disable_shuffling=True)

    def _record_metadata(self, inputs: _Inputs, selection_note: str, counts: dict) -> None:
        self.build_counts = counts
        self.info.metadata.update(vqgan=mimic_codes.vqgan_metadata(inputs.codes), stage=self.builder_config.stage,
                                  selection=selection_note, counts=counts)

    @staticmethod
    def _codes_of(inputs: _Inputs, dicom_id: str) -> np.ndarray:
        return np.asarray(inputs.codes.by_id[dicom_id], np.int16).reshape(-1)


class MimicCxrLlmcxr(_MimicBuilderBase):
    """MIMIC-CXR image/report pairs with VQ-GAN codes and the original's alternating task direction."""

    BUILDER_CONFIGS = [
        MimicCxrConfig(name="stage1", stage=1, description="All views; report = FINDINGS + IMPRESSION."),
        MimicCxrConfig(name="stage2", stage=2, description="PA/AP, earliest study per subject; report = IMPRESSION."),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        features = {**_id_features(), "view": tfds.features.Text(), "report": tfds.features.Text(),
                    "codes": _codes_feature(self.builder_config), "direction": tfds.features.Text()}
        return self._dataset_info(features, "MIMIC-CXR-JPG images as VQ-GAN codes with parsed reports (LLM-CXR).")

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = Path(dl_manager.manual_dir)
        config = self.builder_config
        if config.stage not in (1, 2):
            raise ValueError(f"builder config {config.name}: stage must be 1 or 2, got {config.stage!r}")
        inputs = _read_inputs(manual_dir, config)
        selection, note = _selection(manual_dir, config, inputs) if config.stage == 2 else (None, "all views")
        plans, counts = {}, {}
        for split in mimic_files.SPLITS:
            plans[split], counts[split] = plan_split(
                mimic_files.rows_of_split(inputs.rows, split), inputs.metadata, inputs.codes,
                manual_dir / mimic_files.REPORTS_DIR, config.stage, selection, split)
        _require_records(plans, counts, manual_dir)
        self._record_metadata(inputs, note, counts)
        return {split: self._generate_examples(plan, inputs) for split, plan in plans.items()}

    def _generate_examples(self, plan, inputs: _Inputs):
        for rec in plan:
            yield rec.dicom_id, {**dataclasses.asdict(rec), "codes": self._codes_of(inputs, rec.dicom_id)}


def _require_records(records: dict[str, list], counts: dict[str, dict], source: Path) -> None:
    """TFDS refuses a split without examples by an assertion and a traceback: say which split and why instead."""
    for split, kept in records.items():
        if not kept:
            raise mimic_files.MimicFileError(
                f"{source}: no record of split {split!r} ({mimic_files.SPLITS[split]} in "
                f"{mimic_files.SPLIT_CSV}) is usable: {counts[split]}; check that split's rows, the reports "
                f"({mimic_files.REPORTS_DIR}/files/pXX/pNNNNNNNN/sMMMMMMMM.txt) and the codes")


class MimicCxrVqaLlmcxr(_MimicBuilderBase):
    """CXR-VQA pairs on the stage-2 images of their study (the original's unreleased medvqa_v1 format)."""

    BUILDER_CONFIGS = [MimicCxrConfig(name="default", stage=2, description="VQA on PA/AP earliest-study images.")]

    def _info(self) -> tfds.core.DatasetInfo:
        features = {**_id_features(), "question": tfds.features.Text(), "answer": tfds.features.Text(),
                    "codes": _codes_feature(self.builder_config)}
        return self._dataset_info(features, "Questions and answers about MIMIC-CXR images, with VQ-GAN codes.")

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = Path(dl_manager.manual_dir)
        config = self.builder_config
        vqa_dir = Path(config.vqa_dir) if config.vqa_dir else manual_dir / mimic_files.VQA_DIR
        if not vqa_dir.is_dir():
            raise mimic_files.ManualFilesMissingError(
                f"{vqa_dir}: no VQA directory. Put the original's {mimic_files.VQA_DIR}/pXX/pNNNNNNNN/sMMMMMMMM.txt "
                "files there or set `vqa_dir` in the builder config (the data was never released).")
        inputs = _read_inputs(manual_dir, config)
        selection, note = _selection(manual_dir, config, inputs)
        pairs, counts = read_vqa_dir(vqa_dir)
        study_splits = {(int(r.subject_id), int(r.study_id)): split for split in mimic_files.SPLITS
                        for r in mimic_files.rows_of_split(inputs.rows, split)}
        usable = frozenset(i for i in selection if i in inputs.codes.by_id)
        records = {}
        for split in mimic_files.SPLITS:
            records[split], counts[split] = merge_onto_images(
                pairs, mimic_files.rows_of_split(inputs.rows, split), usable, study_splits, split)
        _require_records(records, counts, vqa_dir)
        self._record_metadata(inputs, note, counts)
        return {split: self._generate_examples(recs, inputs) for split, recs in records.items()}

    def _generate_examples(self, records, inputs: _Inputs):
        for i, rec in enumerate(records):
            yield i, {**dataclasses.asdict(rec), "codes": self._codes_of(inputs, rec.dicom_id)}
