"""VQA builder: the original's per-study files merged onto the selected images of their study (SPEC §6 VQA)."""
from __future__ import annotations

import pytest
import tensorflow_datasets as tfds

from llmcxr_jax.data.mimic_builder import MimicCxrVqaLlmcxr
from llmcxr_jax.data.vqa import VqaFileError, read_vqa_file
from mimic_fixture import OUR_SPLITS, reconstructed_selection, write_mimic_tree, write_vqa_tree

VQA_DIR = "mimic-cxr-jpg_medvqa_v1"


def build(fx, data_dir):
    builder = MimicCxrVqaLlmcxr(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=fx.root))
    return builder


def expected(fx, good, selection):
    """split -> records (dicom_id, question, answer, codes) in file-path then dicom_id order, and counts."""
    by_path = sorted(fx.studies, key=lambda s: f"p{s.subject_id[:2]}/p{s.subject_id}/s{s.study_id}.txt")
    out = {}
    for split, mimic_splits in OUR_SPLITS.items():
        records, pairs, lonely = [], 0, 0
        for study in by_path:
            images = sorted((i for i in fx.images if i.study == study and i.split in mimic_splits
                             and i.codes == "valid" and i.dicom_id in selection), key=lambda i: i.dicom_id)
            if not any(i.study == study and i.split in mimic_splits for i in fx.images):
                continue
            for question, answer in good[(study.subject_id, study.study_id)]:
                pairs += 1
                lonely += not images
                records += [(i.dicom_id, question, answer, i.code_values()) for i in images]
        out[split] = records, {"records": len(records), "pairs": pairs, "no_selected_image": lonely,
                               "unknown_study": 1}
    return out


@pytest.mark.parametrize("fmt", ["dir", "pickle"])
def test_vqa_records_and_counts(tmp_path, fmt):
    fx = write_mimic_tree(tmp_path / "m", codes_format=fmt, selection=fmt == "pickle")
    good = write_vqa_tree(fx.root / VQA_DIR, fx.studies)
    stray = fx.root / VQA_DIR / "p19" / "p19999999" / "s59999999.txt"  # a study in no split
    stray.parent.mkdir(parents=True)
    stray.write_text(repr([{"question": "q", "answer": "a"}]))
    builder = build(fx, tmp_path / "data")
    selection = fx.selection_file if fmt == "pickle" else reconstructed_selection(fx)
    want = expected(fx, good, selection)
    for split in OUR_SPLITS:
        got = [(r["dicom_id"].decode(), r["question"].decode(), r["answer"].decode(), r["codes"].tolist())
               for r in builder.as_data_source(split)]
        assert got == want[split][0]
        assert builder.build_counts[split] == want[split][1]
    assert builder.build_counts["files"] == len(fx.studies) + 1
    assert builder.build_counts["malformed"] == 3 * len(fx.studies)
    assert all(want[split][1]["records"] > 0 and want[split][1]["no_selected_image"] > 0 for split in OUR_SPLITS)


def test_vqa_file_is_a_literal_never_code(tmp_path):
    path = tmp_path / "p10" / "p10000001" / "s50000001.txt"
    path.parent.mkdir(parents=True)
    path.write_text("[__import__('os').system('touch pwned')]\n")
    with pytest.raises(VqaFileError, match=f"{path}:1: not a Python literal"):
        read_vqa_file(path)
    assert not (tmp_path / "pwned").exists()
    path.write_text("[{'question': 'q', 'answer': 'a'}]\n[]\n")
    with pytest.raises(VqaFileError, match="exactly one line, found 2"):
        read_vqa_file(path)
    path.write_text("{'question': 'q', 'answer': 'a'}\n")
    with pytest.raises(VqaFileError, match="expected a list of dicts, got a dict"):
        read_vqa_file(path)
    path.write_bytes(b"[{'question': 'caf\xe9?', 'answer': 'a'}]\n")  # latin-1
    with pytest.raises(VqaFileError, match=f"{path}:1: not UTF-8 text: byte 0xe9 at offset 18 "):
        read_vqa_file(path)
    misplaced = tmp_path / "notes.txt"
    misplaced.write_text("[]")
    with pytest.raises(VqaFileError, match="pNNNNNNNN/sMMMMMMMM.txt"):
        read_vqa_file(misplaced)


def test_answers_that_are_not_strings_are_kept_as_the_original_formatted_them(tmp_path):
    path = tmp_path / "p10" / "p10000001" / "s50000001.txt"
    path.parent.mkdir(parents=True)
    path.write_text("[{'question': 'How many?', 'answer': 2}, {'question': 'Any?', 'answer': True}, "
                    "{'question': 'Size?', 'answer': 1.5}, {'question': 'Which?', 'answer': None}, "
                    "{'question': None, 'answer': 'a'}, {'question': 'Sides?', 'answer': ['L', 'R']}]\n")
    pairs, dropped = read_vqa_file(path)
    assert [(p.question, p.answer) for p in pairs] == [("How many?", "2"), ("Any?", "True"), ("Size?", "1.5"),
                                                       ("Sides?", "['L', 'R']")]
    assert dropped == 2  # the None values: the original's dropna


def test_missing_vqa_dir_is_named(tmp_path):
    fx = write_mimic_tree(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match=f"{fx.root / VQA_DIR}: no VQA directory"):
        build(fx, tmp_path / "data")
