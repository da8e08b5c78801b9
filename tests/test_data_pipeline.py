"""Grain pipeline with the real tokenizer: mixing, process slices, exact resume, masking, buckets, eval, sharding."""
from __future__ import annotations

import collections
import json
import re

import numpy as np
import pytest

from llmcxr_jax.data.pipeline import make_eval_iterator, make_lm_iterator
from llmcxr_jax.tokenizer import LlmCxrTokenizer

LENGTHS = (128, 256, 512, 2048)
_TAG = re.compile(r"\b([RD])(\d+)\b")


@pytest.fixture(scope="module")
def tok():
    return LlmCxrTokenizer.from_pretrained(None)


def mimic(n, n_codes=4):
    """Cheap image/report records: few codes, short reports tagged R<i>."""
    return [{"dicom_id": f"dicom-{i:05d}", "report": f"Report R{i} shows clear lungs.",
             "codes": np.arange(i, i + n_codes, dtype=np.int16) % 1024,
             "direction": ("cxr2report", "report2cxr")[i % 2]} for i in range(n)]


def dolly(n):
    return [{"instruction": f"Say D{i} please", "context": "" if i % 2 else "Some context.", "response": "Done."}
            for i in range(n)]


def tags(tok, batch):
    """The source tag ('R12', 'D3') of every non-padding row."""
    out = []
    for ids in batch["input_ids"]:
        if ids.any():
            found = _TAG.findall(tok.decode(ids[ids > 0]))
            assert len(found) == 1, found
            out.append("".join(found[0]))
    return out


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_mixing_proportions_over_10k(tok):
    it = make_lm_iterator({"mimic": mimic(800), "dolly": dolly(50)}, tok, global_batch_size=50, process_index=0,
                          process_count=1, lengths=LENGTHS)
    is_image = np.concatenate([(b["input_ids"] >= tok.image_offset).any(axis=1) for b in take(it, 200)])
    assert len(is_image) == 10_000
    assert abs(is_image.mean() - 0.8) < 0.01
    assert abs(is_image[:1000].mean() - 0.8) < 0.03  # already within one epoch (1000 examples), after shuffling
    even = make_lm_iterator({"mimic": mimic(800), "dolly": dolly(50)}, tok, global_batch_size=50, process_index=0,
                            process_count=1, lengths=LENGTHS, weights={"mimic": 0.5, "dolly": 0.5})
    share = np.concatenate([(b["input_ids"] >= tok.image_offset).any(axis=1) for b in take(even, 40)]).mean()
    assert abs(share - 0.5) < 0.03


@pytest.mark.parametrize("n_mimic, n_dolly", [(40, 5), (8, 30)])
def test_epoch_exhausts_every_source_and_recycles_the_smaller(tok, n_mimic, n_dolly):
    """One epoch reads the source that is large for its weight exactly once and recycles the other."""
    it = make_lm_iterator({"mimic": mimic(n_mimic), "dolly": dolly(n_dolly)}, tok, global_batch_size=1,
                          process_index=0, process_count=1, lengths=LENGTHS)
    epoch = collections.Counter(t for b in take(it, it.batches_per_epoch) for t in tags(tok, b))
    seen = {src: [epoch[f"{src}{i}"] for i in range(n)] for src, n in (("R", n_mimic), ("D", n_dolly))}
    assert all(c >= 1 for c in seen["R"] + seen["D"])
    exact = "R" if n_mimic / 0.8 >= n_dolly / 0.2 else "D"
    assert set(seen[exact]) == {1}
    assert sum(seen["R"] + seen["D"]) == it.batches_per_epoch


def test_num_epochs_stops_after_whole_epochs(tok):
    it = make_lm_iterator({"mimic": mimic(20), "dolly": dolly(3)}, tok, global_batch_size=3, process_index=0,
                          process_count=1, lengths=LENGTHS, num_epochs=2)
    assert len(list(it)) == 2 * it.batches_per_epoch == 2 * (25 // 3)


def test_processes_get_disjoint_slices(tok):
    sources = {"mimic": mimic(61), "dolly": dolly(13)}
    seen = []
    for index in range(2):  # one example per process and batch, so an epoch is a whole number of batches
        it = make_lm_iterator(sources, tok, global_batch_size=2, process_index=index, process_count=2,
                              lengths=LENGTHS)
        seen.append({t for b in take(it, it.batches_per_epoch) for t in tags(tok, b)})
    assert not seen[0] & seen[1]
    assert {t for t in seen[0] | seen[1] if t[0] == "R"} == {f"R{i}" for i in range(61)}
    assert {t for t in seen[0] | seen[1] if t[0] == "D"} == {f"D{i}" for i in range(13)}


def test_state_round_trip_resumes_exactly(tok):
    sources = {"mimic": mimic(30), "dolly": dolly(6) + [{"instruction": "Say D6", "context": "",
                                                         "response": "very " * 400}]}
    def fresh():
        return make_lm_iterator(sources, tok, global_batch_size=4, process_index=0, process_count=1, seed=7,
                                lengths=(256, 512), max_length=300)
    straight = fresh()
    assert straight.batches_per_epoch < 11  # resume across an epoch boundary
    take(straight, 11)
    state = json.loads(json.dumps(straight.get_state()))
    want = take(straight, 3)
    assert straight.dropped > 0  # the long Dolly record was dropped, and counted
    resumed = fresh()
    resumed.set_state(state)
    got = take(resumed, 3)
    for a, b in zip(got, want):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert (resumed.batches, resumed.dropped) == (straight.batches, straight.dropped)


def test_an_epoch_of_examples_all_too_long_is_an_error_not_an_endless_loop(tok):
    """Every example at or over max_length: the endless stream would drop them forever and never yield a batch."""
    it = make_lm_iterator({"mimic": mimic(5), "dolly": dolly(3)}, tok, global_batch_size=2, process_index=0,
                          process_count=1, lengths=(8,), max_length=8)
    assert it.batches_per_epoch * 2 == 12  # the mix's epoch: 13 examples (the Dolly records repeat), 6 batches
    with pytest.raises(ValueError, match=r"^26 examples in a row \(two epochs.*\) had >= data.max_length=8 tokens"):
        next(it)
    assert it.dropped == 26
    # one example short enough (27 tokens; the others have 31 to 62) is enough to go on, epoch after epoch
    it = make_lm_iterator({"mimic": mimic(5), "dolly": dolly(3) + [{"instruction": "Hi", "context": "",
                                                                    "response": "."}]},
                          tok, global_batch_size=2, process_index=0, process_count=1, lengths=(28,), max_length=28)
    assert [b["input_ids"].shape for b in take(it, 20)] == [(2, 28)] * 20 and it.dropped > 20 * 2
    assert it.log_values() == {"dropped_fraction": it.dropped / (it.dropped + 40)}  # what training logs


def test_same_record_gives_the_same_tokens_every_epoch(tok):
    it = make_lm_iterator({"mimic": mimic(8)}, tok, global_batch_size=2, process_index=0, process_count=1,
                          lengths=LENGTHS)
    rows = collections.defaultdict(list)
    for b in take(it, 3 * it.batches_per_epoch):
        for tag, ids in zip(tags(tok, b), b["input_ids"]):
            rows[tag].append(ids[ids > 0].tolist())
    assert all(len(v) == 3 and v[0] == v[1] == v[2] for v in rows.values())


def test_report_dropout_trains_the_samplers_unconditional_prompt(tok):
    """With report_dropout, a fixed share of report→CXR records (never CXR→report ones) is trained on exactly
    the prompt classifier-free guidance samples against: the same instruction with an empty report."""
    from llmcxr_jax import prompts

    records = mimic(400, n_codes=16)
    plain = make_lm_iterator({"mimic": records}, tok, global_batch_size=8, process_index=0, process_count=1,
                             lengths=LENGTHS, seed=3)
    dropping = make_lm_iterator({"mimic": records}, tok, global_batch_size=8, process_index=0, process_count=1,
                                lengths=LENGTHS, seed=3, report_dropout=0.25)
    changed = 0
    for a, b in zip(take(plain, plain.batches_per_epoch), take(dropping, dropping.batches_per_epoch)):
        for ids_a, weights_a, ids_b, weights_b in zip(a["input_ids"], a["loss_weights"], b["input_ids"],
                                                      b["loss_weights"]):
            if np.array_equal(ids_a, ids_b):
                continue
            changed += 1
            record = records[int(_TAG.search(tok.decode(ids_a[ids_a > 0])).group(2))]
            assert record["direction"] == "report2cxr"
            assert prompts.drops_report(3, record["dicom_id"], 0.25)
            twin = prompts.generation_prompt_ids(tok, prompts.choose_instruction(3, record["dicom_id"], "report2cxr"),
                                                 input_text="")
            assert ids_b[:len(twin)].tolist() == twin
            assert weights_b[:len(twin)].sum() == 0 and weights_b[len(twin)] == 1
            assert np.array_equal(ids_b[weights_b > 0], ids_a[weights_a > 0])  # the same supervised image
    assert 25 <= changed <= 75  # ~50 of the 200 report→CXR records


def test_masking_padding_and_buckets(tok):
    it = make_lm_iterator({"mimic": mimic(10, n_codes=256), "dolly": dolly(4)}, tok, global_batch_size=6,
                          process_index=0, process_count=1, lengths=LENGTHS)
    assert (tok.response_key_id, tok.end_id, tok.image_offset) == (50280, 50277, 50281)
    for batch in take(it, 6):
        ids, weights = batch["input_ids"], batch["loss_weights"]
        assert ids.dtype == np.int32 and weights.dtype == np.float32 and ids.shape == weights.shape
        lengths = (ids != 0).sum(axis=1)
        assert ids.shape[1] == min(n for n in LENGTHS if n >= lengths.max())
        for row, w, n in zip(ids, weights, lengths):
            start = int(np.flatnonzero(row == tok.response_key_id)[0])
            assert not w[:start + 1].any()
            assert (w[start + 1:n] == 1).all() and row[n - 1] == tok.end_id
            assert not w[n:].any() and not row[n:].any()
            if (row[start + 1:n] >= tok.image_offset).any():  # report→CXR: the image is the target
                assert (row[start + 1:n] >= tok.image_offset).sum() == 256


def test_eval_iterator_one_pass_padded(tok):
    sources = {"mimic": mimic(9), "dolly": dolly(2)}
    passes = []
    for index in range(3):
        ev = make_eval_iterator(sources, tok, global_batch_size=6, process_index=index, process_count=3,
                                lengths=LENGTHS)
        batches = list(ev)
        for b in batches:
            assert not b["loss_weights"][b["num_real"]:].any() and not b["input_ids"][b["num_real"]:].any()
        passes.append(batches)
    assert len({len(p) for p in passes}) == 1  # every process steps the same number of times
    real = [t for p in passes for b in p for t in tags(tok, b)]
    assert sum(b["num_real"] for p in passes for b in p) == len(real)
    counts = collections.Counter(real)
    assert {f"R{i}" for i in range(9)} <= counts.keys() and {"D0", "D1"} <= counts.keys()
    assert all(counts[f"R{i}"] == 1 for i in range(9))  # the large source is read once, nothing is shuffled away


def test_bad_configuration_is_refused(tok):
    sources = {"mimic": mimic(4), "dolly": dolly(4)}
    with pytest.raises(ValueError, match="exactly once"):
        make_lm_iterator(sources, tok, global_batch_size=2, process_index=0, process_count=1, weights={"mimic": 1})
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        make_lm_iterator(sources, tok, global_batch_size=4, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="largest bucket 512"):
        make_lm_iterator(sources, tok, global_batch_size=2, process_index=0, process_count=1, lengths=(256, 512))
    with pytest.raises(ValueError, match="keys among"):
        make_lm_iterator({"reports": mimic(4)}, tok, global_batch_size=2, process_index=0, process_count=1)


def test_reads_tfds_data_sources(tok, tmp_path):
    """Built MIMIC and Dolly datasets (ArrayRecord by default) feed the pipeline through `tfds.data_source`."""
    import tensorflow_datasets as tfds

    from llmcxr_jax.data.dolly_builder import Dolly15k
    from llmcxr_jax.data.mimic_builder import MimicCxrLlmcxr
    from mimic_fixture import write_mimic_tree
    from test_data_dolly import write_jsonl

    fx = write_mimic_tree(tmp_path / "mimic")
    (tmp_path / "dolly").mkdir()
    write_jsonl(tmp_path / "dolly" / "databricks-dolly-15k.jsonl")
    for builder, manual in ((MimicCxrLlmcxr(config="stage1", data_dir=tmp_path / "data"), fx.root),
                            (Dolly15k(data_dir=tmp_path / "data"), tmp_path / "dolly")):
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
    sources = {"mimic": tfds.data_source("mimic_cxr_llmcxr/stage1", data_dir=tmp_path / "data", split="validation"),
               "dolly": tfds.data_source("dolly15k", data_dir=tmp_path / "data", split="validation")}
    batches = list(make_eval_iterator(sources, tok, global_batch_size=8, process_index=0, process_count=1))
    rows = [ids[ids > 0] for b in batches for ids in b["input_ids"][:b["num_real"]]]
    images = [row for row in rows if (row >= tok.image_offset).any()]
    assert len(rows) - len(images) == len(sources["dolly"])  # 200 Dolly records outweigh 7 images: read once
    reports = [r["report"].decode() for r in sources["mimic"]]
    texts = [tok.decode(row) for row in images]
    assert all(any(report in text for text in texts) for report in reports)  # every image, recycled
    assert all(any(report in text for report in reports) for text in texts)
    assert abs(len(images) / len(rows) - 0.8) < 0.01


def test_weights_whose_mixing_period_is_huge_are_refused_not_built(tok):
    """Three groups of unrelated denominators gave a 413,604,637-example period: minutes and gigabytes of a Python
    loop before the first batch."""
    vqa = [{"question": "Any effusion?", "answer": "No.", "codes": np.arange(4, dtype=np.int16)}] * 8
    sources = {"mimic": mimic(8), "vqa": vqa, "dolly": dolly(8)}
    with pytest.raises(ValueError, match=r"mixing weights \[0.8, 0.1, 0.101\]: .* period of 413,604,637 examples "
                                         r"\(at most 1,000,000\); round the weights, e.g. to \[0.8, 0.1, 0.1\]"):
        make_lm_iterator(sources, tok, global_batch_size=4, process_index=0, process_count=1,
                         weights={"mimic": 0.8, "vqa": 0.1, "dolly": 0.101})
    it = make_lm_iterator(sources, tok, global_batch_size=4, process_index=0, process_count=1,
                          weights={"mimic": 0.8, "vqa": 0.1, "dolly": 0.1})  # a period of 10
    assert next(it)["input_ids"].shape[0] == 4
