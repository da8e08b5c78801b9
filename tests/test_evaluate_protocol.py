"""The MIMIC-CXR evaluation protocol runner (SPEC §14) on a MIMIC-shaped fixture tree, with a scripted sampler.

These are protocol-runner tests: they check selection, skipping and its counts, sharding, record fields, resumption
and the result files. The sampler is a deterministic stand-in whose outputs spell out what it was given (codes,
seed, instruction, token budget), so the tests can check what the runner asked for; no model is involved.
Expectations come from the fixture's description (tests/mimic_fixture.py) and SPEC §5/§14, not from the runner.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import pickle

import numpy as np
import pytest
from PIL import Image

from llmcxr_jax import evaluate
from llmcxr_jax.evaluate import (EvalInputError, read_eval_ids, read_jsonl, read_results, results_path,
                                 run_mimic_protocol, select_mimic_eval, write_results_pickle)
from llmcxr_jax.lm_checkpoint import checkpoint_identity
from llmcxr_jax.prompts import CXR_VQ_OUTPUT_INSTRUCTION_LIST, choose_instruction
from mimic_fixture import FINGERPRINT, GRID, write_mimic_tree
from vqgan_flax import checkpoint as vqgan_checkpoint
from vqgan_flax.config import VQGANConfig
from vqgan_flax.safe_pickle import restricted_load

SEED = 42
KEEP_TRAIN = ("10000000", "11000001")  # subjects left in `train`; every other image is moved to `test`


class ScriptedSampler:
    """Implements evaluate.EvalSampler. Each output encodes its inputs; `fail_after` raises once that many reports
    have been generated (an interruption in the middle of the next record)."""

    def __init__(self, fail_after: int | None = None, no_image_for: frozenset[str] = frozenset()):
        self.fail_after, self.no_image_for = fail_after, no_image_for
        self.reports_done = 0
        self.report_inputs: list[int] = []  # code sums of the images it was asked to describe

    def cxr_to_report(self, codes, *, seed, instructions, max_new_tokens):
        if self.fail_after is not None and self.reports_done >= self.fail_after:
            raise RuntimeError("interrupted")
        self.reports_done += len(codes)
        self.report_inputs += [int(c.sum()) for c in codes]
        return [json.dumps({"codes_sum": int(c.sum()), "shape": list(c.shape), "seed": seed, "instruction": i,
                            "max_new_tokens": max_new_tokens}) for c, i in zip(codes, instructions)]

    def report_to_cxr(self, reports, *, seed, instructions, max_new_tokens):
        def image(report, instruction):
            if report in self.no_image_for:
                return None
            return np.asarray([len(report), CXR_VQ_OUTPUT_INSTRUCTION_LIST.index(instruction), max_new_tokens,
                               seed % 1024] + [7] * (GRID[0] * GRID[1] - 4)).reshape(GRID)
        return [image(r, i) for r, i in zip(reports, instructions)]


def _never():
    raise AssertionError("the sampler must not be built when nothing is left to generate")


def _move_to_test(fx):
    """Rewrite the split CSV so every image outside KEEP_TRAIN is in `test`: the fixture has only a few
    validate/test frontal images, too few to exercise skipping and sharding. Returns the updated description."""
    images = tuple(i if i.study.subject_id in KEEP_TRAIN else dataclasses.replace(i, split="test")
                   for i in fx.images)
    with (fx.root / "mimic-cxr-2.0.0-split.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["dicom_id", "study_id", "subject_id", "split"])
        writer.writerows([i.dicom_id, i.study.study_id, i.study.subject_id, i.split] for i in images)
    return dataclasses.replace(fx, images=images)


def _eval_ids(fx):
    """Every 4th image left out, plus an id that is not in MIMIC at all."""
    return frozenset(i.dicom_id for n, i in enumerate(fx.images) if n % 4 != 3) | {"not-a-dicom-id"}


def _expected(fx, eval_ids):
    """SPEC §14 on the description: (kept images in dicom_id order, counts by skip reason)."""
    chosen = sorted((i for i in fx.images if i.split in ("validate", "test") and i.view in ("PA", "AP")
                     and i.dicom_id in eval_ids), key=lambda i: i.dicom_id)
    counts = {"eval_ids": len(eval_ids), "eval_ids_not_pa_ap_validate_test": len(eval_ids) - len(chosen),
              "no_report": 0, "undecodable_report": 0, "parse_failure": 0, "invalid_codes": 0, "no_codes": 0}
    kept = []
    for image in chosen:
        if image.study.report == "missing":
            counts["no_report"] += 1
        elif image.study.report not in ("findings_impression", "impression_only"):
            counts["parse_failure"] += 1
        elif image.codes == "missing" or (image.codes != "valid" and fx.codes_format == "dir"):
            counts["no_codes"] += 1  # a codes directory holds only valid codes
        elif image.codes != "valid":
            counts["invalid_codes"] += 1
        else:
            kept.append(image)
    return kept, {**counts, "selected": len(kept)}


@pytest.fixture(params=["pickle", "dir"])
def tree(request, tmp_path):
    fx = _move_to_test(write_mimic_tree(tmp_path / "mimic", codes_format=request.param))
    eval_ids = _eval_ids(fx)
    ids_file = tmp_path / "eval_dicom_ids.pickle"
    ids_file.write_bytes(pickle.dumps(sorted(eval_ids)))
    selection = select_mimic_eval(fx.root, fx.codes_path, read_eval_ids(ids_file))
    return fx, eval_ids, ids_file, selection


def _vqgan_dir(path, fingerprint: str = FINGERPRINT, config=VQGANConfig()):
    """What `evaluate mimic` reads of a VQ-GAN directory before any model loads: its config and fingerprint (the
    default config is LLM-CXR's f16 one: the fixture's 16 x 16 grid of 1024 codes)."""
    path.mkdir()
    (path / vqgan_checkpoint.CONFIG_FILE).write_text(json.dumps(config.to_dict()))
    (path / vqgan_checkpoint.META_FILE).write_text(json.dumps({"format": vqgan_checkpoint.FORMAT,
                                                               "fingerprint": fingerprint}))
    return str(path)


def _run(selection, out, sampler=None, **kw):
    return run_mimic_protocol(selection, lambda: sampler or ScriptedSampler(), out, seed=SEED, **kw)


def test_protocol_runner_selection_follows_spec(tree):
    fx, eval_ids, _, selection = tree
    kept, counts = _expected(fx, eval_ids)
    assert [i.dicom_id for i in selection.items] == [i.dicom_id for i in kept]
    assert dict(selection.counts) == counts
    reasons = ("no_report", "parse_failure", "no_codes") + (("invalid_codes",) if fx.codes_format == "pickle" else ())
    assert all(counts[reason] > 0 for reason in reasons)  # the fixture exercises every skip reason
    for item, image in zip(selection.items, kept):
        assert item.subject_id == image.study.subject_id
        assert item.report == image.study.impression  # IMPRESSION only, normalised
        assert item.codes.reshape(-1).tolist() == image.code_values()


def test_protocol_runner_unmodified_fixture_keeps_only_validate_test_frontal(tmp_path):
    fx = write_mimic_tree(tmp_path / "mimic", codes_format="pickle")
    everything = frozenset(i.dicom_id for i in fx.images)
    selection = select_mimic_eval(fx.root, fx.codes_path, everything)
    kept, counts = _expected(fx, everything)
    assert [i.dicom_id for i in selection.items] == [i.dicom_id for i in kept] and len(kept) >= 2
    assert all(i.split in ("validate", "test") for i in kept)
    assert dict(selection.counts) == counts


def test_protocol_runner_records_have_the_original_fields(tree, tmp_path):
    fx, eval_ids, _, selection = tree
    kept, _ = _expected(fx, eval_ids)
    no_image = frozenset({kept[1].study.impression})
    summary = _run(selection, tmp_path / "out", ScriptedSampler(no_image_for=no_image))
    records = read_results(summary.path)
    assert summary.path.name == "llm-cxr__eval_results_0_1.jsonl"
    assert (summary.shard, summary.resumed, summary.written) == (len(kept), 0, len(kept))
    seeds = set()
    for record, image in zip(records, kept, strict=True):
        assert list(record) == ["dicom_id", "subject_id", "raw_report", "raw_image", "gen_report", "gen_image"]
        assert record["dicom_id"] == image.dicom_id and record["subject_id"] == image.study.subject_id
        assert record["raw_report"] == image.study.impression
        assert record["raw_image"] == [c + 50281 for c in image.code_values()]  # shifted ids, SPEC §6
        asked = json.loads(record["gen_report"])  # what the sampler was given for CXR→report
        assert asked["codes_sum"] == sum(image.code_values()) and asked["shape"] == list(GRID)
        assert asked["instruction"] == choose_instruction(SEED, image.dicom_id, "cxr2report")
        assert asked["max_new_tokens"] == 128
        seeds.add(asked["seed"])
        if image.study.impression in no_image:
            assert record["gen_image"] is None
        else:  # what it was given for report→CXR, as codes (not shifted)
            instruction = choose_instruction(SEED, image.dicom_id, "report2cxr")
            assert record["gen_image"][:4] == [len(image.study.impression),
                                               CXR_VQ_OUTPUT_INSTRUCTION_LIST.index(instruction), 300,
                                               asked["seed"] % 1024]
            assert len(record["gen_image"]) == GRID[0] * GRID[1]
    assert len(seeds) == len(kept)  # one sampling seed per image


def test_protocol_runner_shards_are_disjoint_and_complete(tree, tmp_path):
    _, _, _, selection = tree
    whole = {r["dicom_id"]: r for r in read_results(_run(selection, tmp_path / "whole").path)}
    world = 3
    seen: list[str] = []
    for rank in range(world):
        summary = _run(selection, tmp_path / "sharded", rank=rank, world=world)
        assert summary.path.name == f"llm-cxr__eval_results_{rank}_{world}.jsonl"
        records = read_results(summary.path)
        assert [r["dicom_id"] for r in records] == [i.dicom_id for i in selection.items[rank::world]]
        assert all(r == whole[r["dicom_id"]] for r in records)  # outputs do not depend on the sharding
        seen += [r["dicom_id"] for r in records]
    assert sorted(seen) == sorted(whole) and len(seen) == len(set(seen))
    n = len(selection.items)
    idle = _run(selection, tmp_path / "more_ranks", ScriptedSampler(fail_after=0), rank=n, world=n + 1)
    assert (idle.shard, idle.written, read_results(idle.path), read_results(idle.pickle_path)) == (0, 0, [], [])


def test_protocol_runner_refuses_an_empty_selection(tree, tmp_path):
    fx, _, _, _ = tree
    selection = select_mimic_eval(fx.root, fx.codes_path, ["not-an-id"])
    with pytest.raises(EvalInputError, match=r"nothing to evaluate: no image passed the selection \(.*eval_ids: 1, "
                                             r"eval_ids_not_pa_ap_validate_test: 1"):
        _run(selection, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_protocol_runner_resumes_without_repeating_finished_ids(tree, tmp_path):
    _, _, _, selection = tree
    reference = _run(selection, tmp_path / "uninterrupted").path.read_bytes()
    out, k = tmp_path / "interrupted", 3
    with pytest.raises(RuntimeError, match="interrupted"):
        _run(selection, out, ScriptedSampler(fail_after=k))
    path = results_path(out, 0, 1)
    assert [r["dicom_id"] for r in read_results(path)] == [i.dicom_id for i in selection.items[:k]]
    again = ScriptedSampler()
    summary = _run(selection, out, again)
    assert (summary.resumed, summary.written) == (k, len(selection.items) - k)
    assert again.report_inputs == [int(i.codes.sum()) for i in selection.items[k:]]  # only the unfinished ones
    assert path.read_bytes() == reference


def test_protocol_runner_resume_drops_a_torn_last_line(tree, tmp_path):
    _, _, _, selection = tree
    path = _run(selection, tmp_path / "out").path
    complete = path.read_bytes()
    path.write_bytes(complete[:-25])  # killed while writing the last record
    again = ScriptedSampler()
    _run(selection, tmp_path / "out", again)
    assert again.reports_done == 1 and path.read_bytes() == complete


def test_protocol_runner_finished_shard_does_not_build_the_sampler(tree, tmp_path):
    _, _, _, selection = tree
    _run(selection, tmp_path / "out")
    summary = run_mimic_protocol(selection, _never, tmp_path / "out", seed=SEED)
    assert (summary.resumed, summary.written) == (len(selection.items), 0)


def test_protocol_runner_refuses_to_mix_runs(tree, tmp_path):
    _, _, _, selection = tree
    _run(selection, tmp_path / "out", sampler_settings={"image_mode": "resample"})
    with pytest.raises(EvalInputError, match="seed: 42 there, 7 now"):
        run_mimic_protocol(selection, _never, tmp_path / "out", seed=7, sampler_settings={"image_mode": "resample"})
    with pytest.raises(EvalInputError, match="batch_size: 1 there, 2 now"):  # batches share one seed
        _run(selection, tmp_path / "out", batch_size=2, sampler_settings={"image_mode": "resample"})
    with pytest.raises(EvalInputError, match="image_mode: 'resample' there, 'constrained' now"):
        _run(selection, tmp_path / "out", sampler_settings={"image_mode": "constrained"})
    other_codes = dataclasses.replace(selection, codes={**selection.codes, "codes_source": "/elsewhere"})
    with pytest.raises(EvalInputError, match="codes.codes_source: .* there, '/elsewhere' now"):
        _run(other_codes, tmp_path / "out", sampler_settings={"image_mode": "resample"})
    with pytest.raises(EvalInputError, match="max_tries: not recorded there, 3 now"):
        _run(selection, tmp_path / "out", sampler_settings={"image_mode": "resample", "max_tries": 3})
    foreign = dataclasses.replace(selection, items=selection.items[1:])
    with pytest.raises(EvalInputError, match="not in this rank's share"):
        run_mimic_protocol(foreign, _never, tmp_path / "out", seed=SEED)
    sidecar = next((tmp_path / "out").glob("*.json"))
    sidecar.write_text(sidecar.read_text()[:40])  # e.g. a copy cut short
    with pytest.raises(EvalInputError, match=rf"{sidecar.name}: unreadable settings of .*JSONDecodeError"):
        _run(selection, tmp_path / "out", sampler_settings={"image_mode": "resample"})


def test_jsonl_lines_end_at_newlines_only(tmp_path):
    """JSON strings may hold U+2028 or \\x1c raw (ensure_ascii=False); str.splitlines would cut the line there."""
    path = tmp_path / "gen.jsonl"
    path.write_text("".join(json.dumps({"gen_report": text}, ensure_ascii=False) + "\n"
                            for text in ("a\u2028b", "c\x1cd", "e")), encoding="utf-8")
    assert [r["gen_report"] for r in read_jsonl(path)] == ["a\u2028b", "c\x1cd", "e"]


def test_protocol_runner_writes_the_original_pickle(tree, tmp_path):
    fx, eval_ids, _, selection = tree
    kept, _ = _expected(fx, eval_ids)
    summary = _run(selection, tmp_path / "out", ScriptedSampler(no_image_for=frozenset({kept[0].study.impression})))
    assert summary.pickle_path.name == "llm-cxr__eval_results_0_1.pickle"
    with summary.pickle_path.open("rb") as f:  # readable with every global refused: plain data only
        loaded = restricted_load(f, str(summary.pickle_path), {}, "plain data")
    assert loaded == read_results(summary.path) and loaded[0]["gen_image"] is None
    with pytest.raises(ValueError, match="non-plain values"):
        write_results_pickle([{"raw_image": np.arange(3)}], tmp_path / "bad.pickle")
    assert not (tmp_path / "bad.pickle").exists()


def test_eval_ids_reader_accepts_lists_and_dicts_and_explains_sets(tmp_path):
    ids = ["b-1", "a-2"]
    for name, obj in (("list", ids), ("dict", dict.fromkeys(ids, 1))):
        (tmp_path / name).write_bytes(pickle.dumps(obj))
        assert read_eval_ids(tmp_path / name) == frozenset(ids)
    (tmp_path / "set").write_bytes(pickle.dumps(set(ids)))
    with pytest.raises(EvalInputError, match="pickle.dump\\(sorted"):
        read_eval_ids(tmp_path / "set")


def test_cli_mimic_runs_the_protocol(tree, tmp_path, monkeypatch, capsys):
    fx, eval_ids, ids_file, selection = tree
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    built = []
    monkeypatch.setattr(evaluate, "_load_sampler",
                        lambda args, step: built.append((args.checkpoint, args.vqgan)) or ScriptedSampler())
    vqgan = _vqgan_dir(tmp_path / "vq")
    evaluate.main(["mimic", "--checkpoint", str(checkpoint), "--vqgan", vqgan, "--manual_dir", str(fx.root),
                   "--eval_ids", str(ids_file), "--out", str(tmp_path / "out"), "--rank", "1", "--world", "2"])
    printed = json.loads(capsys.readouterr().out)
    assert built == [(str(checkpoint), vqgan)]  # default codes path found in the manual directory
    assert printed["selection"] == dict(selection.counts) and printed["written"] == len(selection.items[1::2])
    assert [r["dicom_id"] for r in read_results(printed["results"])] == [i.dicom_id for i in selection.items[1::2]]


@pytest.mark.parametrize("vqgan,message", [
    (dict(fingerprint="another-vqgan"), "codes from VQ-GAN fingerprint fixture-vqgan-a, but another-vqgan was asked"),
    (dict(config=VQGANConfig(resolution=128)), r"codes have grid \(16, 16\) and 1024 codes, expected grid \(8, 8\)"),
])
def test_cli_mimic_refuses_codes_of_another_vqgan_before_sampling(tmp_path, monkeypatch, vqgan, message):
    """The codes would mean other images to the LM; the original's pickle records no fingerprint, only its grid
    can be checked."""
    fx = write_mimic_tree(tmp_path / "mimic", codes_format="dir")
    (tmp_path / "ids.pickle").write_bytes(pickle.dumps(["x"]))
    monkeypatch.setattr(evaluate, "_load_sampler", lambda args, step: pytest.fail("sampled"))
    with pytest.raises(SystemExit, match=f"^error: {fx.codes_path}: {message}"):
        evaluate.main(["mimic", "--checkpoint", str(tmp_path), "--vqgan", _vqgan_dir(tmp_path / "vq", **vqgan),
                       "--manual_dir", str(fx.root), "--eval_ids", str(tmp_path / "ids.pickle"),
                       "--out", str(tmp_path / "out")])


def _workdir_at_step(path, step):
    """A training workdir whose newest complete checkpoint is `step` (an Orbax temporary directory beside it)."""
    (path / "checkpoints" / str(step) / "state").mkdir(parents=True)
    (path / "checkpoints" / str(step) / "state" / "data").write_bytes(b"weights")
    (path / "checkpoints" / f"{step + 1}.orbax-checkpoint-tmp-1").mkdir()


@pytest.mark.parametrize("kind, change, setting", [
    ("hf", ["--image_mode", "constrained"], "image_mode: 'resample' there, 'constrained' now"),
    ("hf", ["--max_tries", "3"], "max_tries: 10 there, 3 now"),
    ("hf", ["--batch_size", "2"], "batch_size: 1 there, 2 now"),
    ("hf", "resave", "checkpoint.files: '[0-9a-f]{64}' there, '[0-9a-f]{64}' now"),
    ("hf", "move", "checkpoint.path: '.*ckpt' there, '.*moved' now"),
    ("workdir", "train_on", "checkpoint.step: 100 there, 200 now"),
    ("hf", "written_before_row_keys", "row_keys: not recorded there, 'position in the batch' now"),
])
def test_cli_mimic_resumes_only_with_the_same_model_and_sampler(tree, tmp_path, monkeypatch, capsys, kind, change,
                                                                setting):
    fx, _, ids_file, _ = tree
    checkpoint = tmp_path / "ckpt"
    if kind == "hf":
        checkpoint.mkdir()
        (checkpoint / "config.json").write_text("{}")
        (checkpoint / "model.safetensors").write_bytes(b"weights")
    else:
        _workdir_at_step(checkpoint, 100)
    loaded_steps = []
    monkeypatch.setattr(evaluate, "_load_sampler", lambda args, step: loaded_steps.append(step) or ScriptedSampler())

    vqgan = _vqgan_dir(tmp_path / "vq")

    def run(ckpt, *extra):
        evaluate.main(["mimic", "--checkpoint", str(ckpt), "--vqgan", vqgan, "--manual_dir", str(fx.root),
                       "--eval_ids", str(ids_file), "--out", str(tmp_path / "out"), *extra])
        return json.loads(capsys.readouterr().out)

    first = run(checkpoint)
    assert loaded_steps == [100 if kind == "workdir" else None]  # the model of the recorded identity is loaded
    assert run(checkpoint)["resumed"] == first["written"] > 0  # the same settings resume
    extra: list[str] = change if isinstance(change, list) else []
    if change == "resave":
        (checkpoint / "model.safetensors").write_bytes(b"other weights")
    elif change == "move":
        checkpoint = checkpoint.rename(tmp_path / "moved")
    elif change == "train_on":
        _workdir_at_step(checkpoint, 200)
    elif change == "written_before_row_keys":  # a sidecar as evaluate wrote it before the one-call batches
        sidecar = tmp_path / "out" / "llm-cxr__eval_results_0_1.json"
        recorded = json.loads(sidecar.read_text())
        del recorded["settings"]["row_keys"]
        sidecar.write_text(json.dumps(recorded))
    with pytest.raises(SystemExit, match=f"^error: .*llm-cxr__eval_results_0_1.json: cannot resume .*{setting}"):
        run(checkpoint, *extra)


def test_checkpoint_identity_needs_a_model_with_a_complete_step(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: not a model"):
        checkpoint_identity(tmp_path)
    (tmp_path / "checkpoints" / "5.orbax-checkpoint-tmp-1").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="checkpoints: no complete checkpoint step yet"):
        checkpoint_identity(tmp_path)


def test_cli_reports_scores_result_files(tmp_path, capsys):
    refs = ["No acute cardiopulmonary process.", "Small left pleural effusion.", "Right pneumothorax."]
    gens = ["No acute cardiopulmonary process.", "Small left pleural effusion.", "No pneumothorax."]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps({"dicom_id": f"d{n}", "subject_id": "1", "raw_report": r, "raw_image": [],
                                        "gen_report": g, "gen_image": None}) + "\n"
                            for n, (r, g) in enumerate(zip(refs, gens))))
    evaluate.main(["reports", "--generated", str(path), "--labeler", "phantom"])
    printed = json.loads(capsys.readouterr().out)
    # ROUGE-L F per pair: 1, 1 and LCS "pneumothorax" of 2 tokens each = 1/2; the labeler reads pneumothorax_right
    # in the last reference only (missed), and no_finding wrongly in its generated text.
    assert printed["n"] == 3 and printed["rougeL"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert printed["labels/micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    evaluate.main(["reports", "--generated", str(path)])  # by default no labeler: it reads phantom reports only
    assert not any(k.startswith("labels/") for k in json.loads(capsys.readouterr().out))
    other = tmp_path / "refs.jsonl"
    other.write_text(json.dumps({"dicom_id": "d0", "text": refs[0]}) + "\n")
    with pytest.raises(SystemExit, match="^error: .*have no reference"):
        evaluate.main(["reports", "--generated", str(path), "--reference", str(other), "--reference_key", "text"])
    with pytest.raises(SystemExit, match=r"^error: \[Errno 2\] No such file or directory: '\S*absent.jsonl'"):
        evaluate.main(["reports", "--generated", str(tmp_path / "absent.jsonl")])
    (tmp_path / "latin1.jsonl").write_bytes(path.read_bytes() + '{"dicom_id": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(SystemExit, match=r"^error: .*latin1.jsonl:4: not UTF-8 text: byte 0xe9"):
        evaluate.main(["reports", "--generated", str(tmp_path / "latin1.jsonl")])
    with pytest.raises(SystemExit, match=r"^error: .*absent.pickle: no such file \(the eval_dicom_ids.pickle"):
        evaluate.main(["mimic", "--checkpoint", "C", "--vqgan", "V", "--manual_dir", str(tmp_path),
                       "--eval_ids", str(tmp_path / "absent.pickle"), "--out", str(tmp_path / "out")])


def test_cli_decode_writes_the_originals_jpegs_and_reports_file(tmp_path, capsys):
    """SPEC §14 decode_cxr_all.py: records holding a None are dropped; JPEGs as the original saved them."""
    import vqgan_flax
    from vqgan_flax.config import PRESETS
    from vqgan_flax.images import postprocess_original

    config = PRESETS["tiny"]
    vqgan_flax.checkpoint.write(tmp_path / "vq", config, vqgan_flax.checkpoint.random_params(config, 0))
    rng = np.random.default_rng(0)
    codes = {f"d{n}": rng.integers(0, config.num_codes, config.grid).tolist() for n in range(4)}
    records = [{"dicom_id": i, "subject_id": "1", "raw_report": f"Reference {i}.", "raw_image": [1, 2],
                "gen_report": f"Generated {i}.", "gen_image": [c for row in codes[i] for c in row]} for i in codes]
    records[1]["gen_report"] = None  # the original drops a record holding any None
    records[3]["gen_image"] = None  # in a pickle too (a report->CXR row that gave no image)
    (tmp_path / "r0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
    evaluate.write_results_pickle(records[2:], tmp_path / "r1.pickle")  # the original's format reads too
    evaluate.main(["decode", "--results", str(tmp_path / "r0.jsonl"), str(tmp_path / "r1.pickle"), "--vqgan",
                   str(tmp_path / "vq"), "--out", str(tmp_path / "out")])
    printed = json.loads(capsys.readouterr().out)
    assert (printed["records"], printed["dropped_with_none"], printed["decoded"]) == (4, 2, 2)
    images = sorted(p.name for p in (tmp_path / "out" / "generated_imgs_jpg").iterdir())
    assert images == [".decoded_from.json", "d0.jpg", "d2.jpg"]  # the first: what they were decoded from
    assert (tmp_path / "out" / "generated_reports").read_text() == \
        "d0\nReference d0.\nGenerated d0.\n\nd2\nReference d2.\nGenerated d2.\n\n"
    model = vqgan_flax.load(tmp_path / "vq")
    expected = postprocess_original(np.asarray(model.decode(np.asarray([codes["d2"]], np.int32))))[0]
    same_encoding = io.BytesIO()
    Image.fromarray(expected).save(same_encoding, format="JPEG")  # what matplotlib's imsave hands to PIL
    jpg = np.asarray(Image.open(tmp_path / "out" / "generated_imgs_jpg" / "d2.jpg"))
    assert jpg.shape == expected.shape == (config.resolution, config.resolution, 3)
    np.testing.assert_array_equal(jpg, np.asarray(Image.open(same_encoding)))
    for change, message in [
        ({"gen_image": [1, 2, 3]}, f"gen_image of d0 is not 256 codes in \\[0, {config.num_codes}\\)"),
        ({"gen_image": [config.num_codes] * 256}, "gen_image of d0 is not 256 codes in"),  # would decode clipped
        ({"gen_image": [-1] * 256}, "gen_image of d0 is not 256 codes in"),
        ({"gen_image": [[1, 2], [3]]}, r"record 1 \('d0'\): gen_image is not a flat list of int codes or null"),
        ({"gen_image": [1.5] * 256}, r"record 1 \('d0'\): gen_image is not a flat list of int codes or null"),
        ({"dicom_id": 5}, r"record 1 \(5\): dicom_id is a int, not a str"),
        ({"gen_report": ["x"]}, r"record 1 \('d0'\): gen_report is a list, not a str or null"),
    ]:
        (tmp_path / "bad.jsonl").write_text(json.dumps(dict(records[0], **change)) + "\n")
        with pytest.raises(SystemExit, match=r"^error: .*bad.jsonl: " + message):
            evaluate.main(["decode", "--results", str(tmp_path / "bad.jsonl"), "--vqgan", str(tmp_path / "vq"),
                           "--out", str(tmp_path / "out2")])
    assert not (tmp_path / "out2").exists()
    # The results regenerated at the same path (another model): the images there would be kept beside its reports
    (tmp_path / "r0.jsonl").write_text("".join(json.dumps(dict(r, gen_image=[5] * 256)) + "\n" for r in records[:2]))
    with pytest.raises(SystemExit, match=r"^error: .*generated_imgs_jpg: the images of 1 ids there were decoded "
                                         r"from other codes than these \(e.g. \['d0'\]\); use another --out"):
        evaluate.main(["decode", "--results", str(tmp_path / "r0.jsonl"), str(tmp_path / "r1.pickle"), "--vqgan",
                       str(tmp_path / "vq"), "--out", str(tmp_path / "out")])
    (tmp_path / "r0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:2]))  # as they were
    evaluate.main(["decode", "--results", str(tmp_path / "r0.jsonl"), str(tmp_path / "r1.pickle"), "--vqgan",
                   str(tmp_path / "vq"), "--out", str(tmp_path / "out")])
    assert json.loads(capsys.readouterr().out)["decoded"] == 0  # resumed: nothing left to decode
