"""Nothing lost, nothing silent for `rapiddiff generate` outputs: folder locks, no overwriting, validation before
run.json, pid-tagged temporaries cleaned up, disk-full errors naming the file, the weights' content in the run's
fingerprint, `rapiddiff manifest --verify` reading the parts, BOM prompt files, requests too large for memory."""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import PIL.Image
import pytest
import torch

from rapiddiff import cli
from rapiddiff.batch import files as batch_files
from rapiddiff.batch.lock import FolderBusy
from rapiddiff.batch.prompts import Defaults, iter_chunk, scan_prompt_file
from rapiddiff.batch.run import BatchJob, BatchSettings, Layout, Worker, run_workers

PROMPTS = [{"prompt": "a red cube", "num_images": 2}, {"prompt": "a cat"}, {"prompt": "a dog", "num_images": 2}]


@pytest.fixture(autouse=True)
def hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


class FakePipe:
    """One 8x8 image per generator, coloured by its seed; `fail` raises before any image (a pipeline check)."""

    def __init__(self, fail: Exception | None = None):
        self.fail, self.calls = fail, 0

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, prompt, generator, **kwargs):
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        return SimpleNamespace(images=[PIL.Image.new("RGB", (8, 8), (g.initial_seed() % 256, 0, 0)) for g in generator])


def model_dir(root: Path) -> Path:
    model = root / "model"
    (model / "unet").mkdir(parents=True, exist_ok=True)
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(bytes(range(256)) * 64)
    (model / "model_index.json").write_text("{}")
    return model


def prepare(root: Path, worker: Worker | None = None, overwrite: bool = False, **changes) -> BatchJob:
    values = dict(model=str(root / "model"), batch_size=2, seed=7, steps=2, guidance=7.5, negative_prompt=None,
                  num_images=1, height=8, width=8, scheduler=None, attention="sdpa", dtype="float32",
                  device_type="cpu", compile=False) | changes  # fmt: skip
    prompts = root / "p.jsonl"
    if not prompts.exists():
        prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    return BatchJob.prepare(BatchSettings(**values), prompts, root / "out", None, worker, overwrite)


def finish(job: BatchJob, pipe=None) -> int:
    try:
        return run_workers(job, Worker(), lambda: pipe or FakePipe(), lambda message: None)
    finally:
        job.release()


@pytest.fixture
def done(tmp_path) -> Path:
    """A finished fake run: 5 images in 3 chunks."""
    model_dir(tmp_path)
    assert finish(prepare(tmp_path)) == 0
    return tmp_path / "out"


# --- locks ------------------------------------------------------------------------------------------------------------
def test_a_second_run_into_a_locked_folder_is_refused_naming_the_owner(tmp_path):
    model_dir(tmp_path)
    first = prepare(tmp_path)
    for changes in ({}, {"steps": 3}):  # same settings or not: one run owns the folder
        with pytest.raises(FolderBusy) as info:
            prepare(tmp_path, **changes)
        message = str(info.value)
        assert f"pid {os.getpid()}" in message and socket.gethostname() in message and "UTC" in message
        assert "worker-0.lock" in message
    # a run with another worker count is refused by the workers it does not collide with as well
    with pytest.raises(FolderBusy, match="a run with 1 worker"):
        prepare(tmp_path, Worker(1, 2, 0, "1/2"))
    first.release()
    assert finish(prepare(tmp_path)) == 0  # a released (or dead) owner's lock is free


def test_settings_are_validated_before_run_json_is_written(tmp_path):
    """The pipeline refusing a setting (`--width 30`) leaves no run.json: the corrected run is not refused."""
    model_dir(tmp_path)
    job = prepare(tmp_path, width=30)
    with pytest.raises(ValueError, match="divisible"):
        finish(job, FakePipe(ValueError("width must be divisible by 8, got 30")))
    out = tmp_path / "out"
    assert not (out / "run.json").exists() and not (out / "images").exists()
    assert finish(prepare(tmp_path, width=32)) == 0
    assert json.loads((out / "run.json").read_text())["settings"]["width"] == 32


def test_cli_width_error_writes_no_run_json(tiny_sd_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\n")
    out = tmp_path / "out"
    argv = ["generate", "--prompts", str(prompts), "--model", str(tiny_sd_dir), "-o", str(out), "--steps", "1"]
    assert cli.main([*argv, "--height", "32", "--width", "30"]) == 2
    assert "width must be divisible by 8" in capsys.readouterr().err
    assert not (out / "run.json").exists()


def test_other_settings_refused_unless_overwrite(done, tmp_path, capsys):
    with pytest.raises(ValueError, match="other settings.*settings.steps: was 2, now 3.*--overwrite"):
        prepare(tmp_path, steps=3)
    assert finish(prepare(tmp_path, overwrite=True, steps=3)) == 0
    assert json.loads((done / "run.json").read_text())["settings"]["steps"] == 3
    records = [json.loads(line) for line in (done / "manifest.jsonl").read_text().splitlines()]
    assert {r["steps"] for r in records} == {3} and len(records) == 5


def test_corrupt_run_json_is_named(done, tmp_path):
    (done / "run.json").write_text('{"format": ')
    with pytest.raises(ValueError, match=r"run.json: not valid JSON .*line 1, column 12"):
        prepare(tmp_path)


# --- temporaries, disk full -------------------------------------------------------------------------------------------
def test_disk_full_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    model_dir(tmp_path)
    job = prepare(tmp_path)

    fsync = os.fsync

    def full(fd):  # the disk fills up at the first commit (run.json is written)
        if "/parts/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)

    monkeypatch.setattr(batch_files.os, "fsync", full)
    with pytest.raises(OSError, match=r"cannot write .*parts/00000000.jsonl: No space left on device") as info:
        finish(job)
    assert info.value.errno == errno.ENOSPC
    out = tmp_path / "out"
    assert not list(out.rglob("*.tmp*"))
    monkeypatch.undo()
    # leftovers of a killed run (other pids) are removed by the next run
    (out / "parts" / "00000001.jsonl.tmp-999999").write_text("half")
    image = Layout(out).image(2)
    image.parent.mkdir(parents=True, exist_ok=True)
    image.with_name(image.name + ".tmp-999999").write_bytes(b"half")
    assert finish(prepare(tmp_path)) == 0
    assert not list(out.rglob("*.tmp*")) and len(Layout(out).committed()) == 3


def test_temporary_names_are_per_process(tmp_path):
    assert batch_files.temporary(tmp_path / "a.png").name == f"a.png.tmp-{os.getpid()}"


# --- the weights' fingerprint ---------------------------------------------------------------------------------------
def test_same_size_change_of_the_unet_file_is_refused_naming_it(done, tmp_path):
    weights = tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 + 3] ^= 0xFF  # one byte in the middle, same size, same mtime
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size
    with pytest.raises(ValueError, match=r"model.files.unet/diffusion_pytorch_model.safetensors: was"):
        prepare(tmp_path)


def test_weight_hashes_are_cached_by_file_identity(tmp_path, monkeypatch):
    from rapiddiff.utils import file_hash

    path = tmp_path / "w.bin"
    path.write_bytes(b"x" * 1000)
    first = file_hash.file_digests([path])
    calls = []
    monkeypatch.setattr(file_hash, "hash_file", lambda p: calls.append(p) or "fresh")
    assert file_hash.file_digests([path]) == first and not calls  # from the cache
    path.write_bytes(b"y" * 1000)
    assert file_hash.file_digests([path]) == {path: "fresh"} and calls == [path]


# --- rapiddiff manifest --verify ------------------------------------------------------------------------------------
def verify(out: Path, capsys) -> tuple[int, str]:
    code = cli.main(["manifest", str(out), "--verify"])
    return code, capsys.readouterr().out


def test_verify_reads_the_parts_not_a_stale_manifest(done, capsys):
    assert verify(done, capsys)[0] == 0
    (done / "parts" / "00000001.jsonl").unlink()
    code, text = verify(done, capsys)
    assert code == 1 and "2 of 3 chunk(s) committed" in text and "missing: 2 image(s), numbers 2-3" in text
    assert "manifest.jsonl is stale" in text and "verify: OK" not in text


def test_verify_names_a_truncated_png_and_a_truncated_part(done, capsys):
    image = done / "images" / "000000" / "000000001.png"
    image.write_bytes(image.read_bytes()[:40])
    part = done / "parts" / "00000002.jsonl"
    part.write_bytes(part.read_bytes()[:-30])
    code, text = verify(done, capsys)
    assert code == 1
    assert "images/000000/000000001.png cannot be read" in text
    assert "parts/00000002.jsonl: truncated" in text and "parts/00000002.jsonl line 1: not valid JSON" in text
    assert "Traceback" not in text


def test_manifest_with_a_corrupt_run_json_is_an_error_naming_it(done, capsys):
    (done / "run.json").write_text('{"prompts": {"images": 5}, "settings": ')
    code, text = verify(done, capsys)
    assert code == 2 and "run.json: not valid JSON" in text and "Traceback" not in text


# --- prompt files ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, first", [("p.txt", "a red cube"), ("p.jsonl", '{"prompt": "a red cube"}')])
def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path, name, first):
    path = tmp_path / name
    path.write_text(f"{first}\n{first}\n", encoding="utf-8-sig")
    defaults = Defaults(None, 1, 2, 7.5, 0)
    index = scan_prompt_file(path, 1, defaults)
    assert [iter_chunk(path, index, c, defaults)[0].entry.prompt for c in range(2)] == ["a red cube"] * 2


# --- single-prompt outputs ------------------------------------------------------------------------------------------
def test_an_existing_output_is_not_overwritten_unless_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cat.png").write_bytes(b"keep me")
    assert cli.main(["generate", "a cat", "--model", "no-model", "-o", "cat.png"]) == 2
    err = capsys.readouterr().err
    assert "cat.png already exists; pass --overwrite" in err and "no-model" not in err
    assert cli.main(["generate", "a cat", "--model", "no-model", "-o", "cat.png", "--overwrite"]) == 2
    assert "no-model" in capsys.readouterr().err  # past the check: the model is looked at
    assert (tmp_path / "cat.png").read_bytes() == b"keep me"


def test_write_image_never_replaces_a_file_created_meanwhile(tmp_path):
    from rapiddiff.batch.checks import write_image

    image = PIL.Image.new("RGB", (8, 8))
    (tmp_path / "a.png.tmp-999999").write_bytes(b"left by a dead process")
    write_image(image, tmp_path / "a.png", overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
    (tmp_path / "b.png").write_bytes(b"another process")
    with pytest.raises(ValueError, match="b.png already exists"):
        write_image(image, tmp_path / "b.png", overwrite=False)
    assert (tmp_path / "b.png").read_bytes() == b"another process" and len(list(tmp_path.iterdir())) == 2
    write_image(image, tmp_path / "b.png", overwrite=True)
    assert PIL.Image.open(tmp_path / "b.png").size == (8, 8)


# --- request size against memory ----------------------------------------------------------------------------------
def test_a_call_that_cannot_fit_is_refused_before_any_model_runs(tiny_sd_dir):
    from rapiddiff import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"this call \(4096 image\(s\) at 512x512\) cannot fit: it needs at least "
                                         r"[\d.]+ GiB .* but the host has [\d.]+ (GiB|MiB) available"):  # fmt: skip
        pipe("a cat", num_images_per_prompt=4096, height=512, width=512, num_inference_steps=1)
    assert time.perf_counter() - start < 2


def test_memory_estimate_formula():
    from rapiddiff.pipelines.checks import MemoryRequest

    config = {"in_channels": 4, "block_out_channels": [320, 640], "layers_per_block": 2}
    request = MemoryRequest.for_unet(config, 2, True, 512, 512, 8, torch.float16)
    # latents 2 x 4 x 64 x 64 + 4 full-resolution activations of (4, 320, 64, 64), in float16
    assert request.bytes == 2 * 64 * 64 * (2 * 4 + 4 * 4 * 320)


@pytest.mark.parametrize("batch", [False, True])
def test_cli_huge_size_fails_fast(tiny_sd_dir, tmp_path, capsys, batch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\n")
    source = ["--prompts", str(prompts)] if batch else ["a red cube"]
    start = time.perf_counter()
    code = cli.main(["generate", *source, "--model", str(tiny_sd_dir), "-o", str(tmp_path / "out"),
                     "--height", "100000", "--width", "100000"])  # fmt: skip
    assert code == 2 and time.perf_counter() - start < 2
    err = capsys.readouterr().err
    assert "at --height 100000 --width 100000 cannot fit" in err and "available" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.dist
def test_two_runs_started_together_one_is_refused(tiny_sd_dir, tmp_path):
    """Two `generate --prompts` processes into one new folder at the same moment, with different --steps: one runs,
    the other is refused (by the lock, or by the settings of the run that got there first); nothing is mixed."""
    import subprocess
    import sys

    import rapiddiff

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\na blue ball\n")
    out = tmp_path / "out"
    src = str(Path(rapiddiff.__file__).resolve().parents[1])
    env = os.environ | {"PYTHONPATH": src, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    runs = [
        subprocess.Popen([sys.executable, "-m", "rapiddiff", "generate", "--prompts", str(prompts), "--model",
                          str(tiny_sd_dir), "-o", str(out), "--height", "32", "--width", "32", "--batch-size", "1",
                          "--steps", steps], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for steps in ("2", "3")
    ]  # fmt: skip
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    winner = ("2", "3")[[code for code, _ in results].index(0)]
    loser = next(err for code, err in results if code == 2)
    assert "is in use by pid" in loser or "holds a run with other settings" in loser, loser
    assert json.loads((out / "run.json").read_text())["settings"]["steps"] == int(winner)
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in records] == [int(winner)] * 2
