"""Pretokenization without Ray: tar sources of class trees, the overlapped stages against a
sequential encode, caption samples without an image or caption, and the released MaskGIT
tokenizer and CLIP text encoder given by path. Its helpers are
tests/test_pretokenize.py's, its fixtures conftest.py's."""

from __future__ import annotations

import collections
import json
import multiprocessing
import resource
import shutil
import tarfile
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch
import yaml
from test_pretokenize import REPO_ROOT, direct_ids, job_config

from enat.cluster.pretokenize_cmd import reason_kind
from enat.pipelines.config import TextEncoderConfig
from enat.pipelines.images import center_crop, decode_image, to_array
from enat.pipelines.model_io import load_model
from enat.pipelines.pretokenize import ShardTask, encode_images, finish, prepare, process_shard
from enat.pipelines.shards import read_shard
from enat.pipelines.sources import plan_source
from enat.pipelines.stages import worker_pool


def test_tars_of_class_trees_plan_like_the_tree_and_give_the_same_ids(demo, tokenizer_dir, tmp_path):
    tree = demo / "imagenet" / "train"
    whole = tmp_path / "whole"
    whole.mkdir()
    with tarfile.open(whole / "train.tar", "w") as tar:
        tar.add(tree, arcname="train")
    per_class = tmp_path / "per_class"
    per_class.mkdir()
    for folder in sorted(tree.iterdir()):
        with tarfile.open(per_class / f"{folder.name}.tar", "w") as tar:
            for path in sorted(folder.iterdir()):
                tar.add(path, arcname=path.name)
    plans = [plan_source(f"imagenet:{root}") for root in (demo / "imagenet", whole, per_class)]
    labelled = [sorted((i.label, i.source.rsplit("/", 1)[-1].split("::")[-1]) for i in plan.items)
                for plan in plans]
    assert labelled[0] == labelled[1] == labelled[2] and len(labelled[0]) == 59
    assert plans[0].classes == plans[1].classes == plans[2].classes
    assert plans[0].fingerprint() == plan_source(f"imagenet:{demo / 'imagenet'}").fingerprint()

    config = job_config(source=f"imagenet:{whole}", out=str(tmp_path / "out"), tokenizer=tokenizer_dir,
                        shard_size=100)
    job = prepare(config)
    process_shard(job.pending[0])
    from_tar = {s.meta["source"].split("::")[1].removeprefix("train/"): s
                for s in read_shard(job.pending[0].shard_url)}
    model = load_model(tokenizer_dir).model
    direct = direct_ids(model, [(tree / relative).read_bytes() for relative in from_tar])
    assert np.array_equal(np.stack([s.tokens for s in from_tar.values()]), direct)
    assert isinstance(job.pending[0], ShardTask) and len(from_tar) == 59
    assert len(plan_source(f"folder:{tree}").items) == 59  # unlabeled: every file below


@pytest.mark.parametrize("encode_on_workers", [True, False], ids=["cpu-workers-encode", "gpu-thread-encodes"])
def test_overlapped_stages_give_the_ids_of_a_sequential_encode(demo, tokenizer_dir, tmp_path,
                                                               encode_on_workers):
    """Two worker processes, batches that straddle rejected inputs and a short last batch:
    ids and mirrored ids equal a plain loop that decodes, then encodes in the same batches,
    whether the workers encode (on CPU) or the task's encoding thread does (as on a GPU)."""
    folder = tmp_path / "raw" / "train" / "mixed"
    folder.mkdir(parents=True)
    for i, path in enumerate(sorted((demo / "imagenet" / "train").rglob("*.png"))[:23]):
        shutil.copy(path, folder / f"{i:02d}.png")
    (folder / "03b.png").write_bytes(b"")  # rejected between kept inputs
    (folder / "11b.png").write_bytes((folder / "11.png").read_bytes()[:200])  # truncated
    config = job_config(source=f"imagenet:{folder.parent.parent}", out=str(tmp_path / "out"),
                        tokenizer=tokenizer_dir, shard_size=100, batch_size=4, flip=True)
    job = prepare(config)
    record = process_shard(job.pending[0], workers=2, encode_on_workers=encode_on_workers)
    assert [r["input"] for r in record["rejected"]] == ["mixed/03b.png", "mixed/11b.png"]
    samples = read_shard(job.pending[0].shard_url)
    assert [s.meta["source"] for s in samples] == [f"mixed/{i:02d}.png" for i in range(23)]
    assert [s.key for s in samples] == [i.key for i in job.plan.items if "b." not in i.source]

    model = load_model(tokenizer_dir).model
    arrays = [to_array(center_crop(decode_image((folder.parent / s.meta["source"]).read_bytes())[0], 32))
              for s in samples]
    images = np.stack(arrays)
    sequential = encode_images(model, images, config.batch_size)
    mirrored = encode_images(model, np.ascontiguousarray(images[..., ::-1]), config.batch_size)
    assert np.array_equal(np.stack([s.tokens for s in samples]), sequential)
    assert np.array_equal(np.stack([s.flip_tokens for s in samples]), mirrored)
    assert record["written"] == 23 and record["cpu_s"] > 0


def page_faults_of_batches(megabytes: int, arrays: int, rounds: int) -> int:
    """Minor page faults of `rounds` rounds that each allocate, fill and free `arrays`
    arrays of `megabytes` MiB, as the encoder does with its activations."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        batch = [np.ones(megabytes << 20, np.uint8) for _ in range(arrays)]
        del batch
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_workers_reuse_the_memory_they_free():
    """A pretokenize worker keeps freed blocks for its next batches; a plain process hands
    them back to the kernel and faults every page in again (here 11,000 faults against
    1,500)."""
    work = (page_faults_of_batches, 10, 3, 10)
    in_worker = worker_pool(1).submit(*work).result()
    with ProcessPoolExecutor(1, multiprocessing.get_context("spawn")) as plain:
        in_plain_process = plain.submit(*work).result()
    assert in_worker * 3 < in_plain_process, (in_worker, in_plain_process)


def test_caption_samples_without_image_or_caption_are_rejected_without_ray(demo, tokenizer_dir, tmp_path):
    """Listing rejections reach the manifest; prepare/process_shard/finish need no Ray."""
    source = tmp_path / "cc3m"
    source.mkdir()
    with tarfile.open(demo / "cc3m" / "00000.tar") as original, tarfile.open(source / "0.tar", "w") as tar:
        for member in original:
            key = member.name.split(".")[0]
            if (key.endswith("0") and member.name.endswith(".jpg")) or (
                    key.endswith("1") and member.name.endswith(".txt")):
                continue  # every 10th sample loses its image, the next one its caption
            tar.addfile(member, original.extractfile(member))
    (source / "0.parquet").write_bytes(b"metadata, not an input")
    config = job_config(source=f"cc3m:{source}", out=str(tmp_path / "out"), tokenizer=tokenizer_dir,
                        shard_size=10, text=TextEncoderConfig(name="none"))
    job = prepare(config)
    records = [process_shard(task) for task in job.pending]
    manifest = finish(job, {"records": len(records)})
    reasons = collections.Counter(reason_kind(r["reason"]) for r in manifest.rejected)
    assert reasons == {"no image in sample": 3, "no caption in sample": 3}
    assert manifest.totals["inputs"] == 25 and manifest.totals["written"] == 19
    assert manifest.text_encoder is None
    assert all(s.caption and s.text is None for s in read_shard(manifest.shard_urls(config.out)[0]))


def test_released_maskgit_checkpoint_loads_through_the_converter(tmp_path):
    fixtures = REPO_ROOT.parent / "shared" / "fixtures" / "reference" / "vqgan_tiny"
    if not fixtures.is_dir():
        pytest.skip("reference fixtures not present")
    from safetensors.torch import load_file

    from enat.models import config_from_reference, config_to_dict
    from enat.pipelines.model_io import load_tokenizer

    reference = json.loads((fixtures / "config.json").read_text())
    preset = tmp_path / "vqgan.yaml"
    config = config_from_reference("maskgit_vqgan", reference["constructor_args"])
    preset.write_text(yaml.safe_dump(config_to_dict(config)))
    loaded = load_tokenizer(str(fixtures / "state_dict.safetensors"), str(preset))
    cases = load_file(fixtures / "cases.safetensors")
    name = next(k for k in cases if k.endswith("token_ids")).removesuffix("token_ids")
    with torch.no_grad():
        ids = loaded.model.encode(cases[f"{name}image"])
    assert torch.equal(ids.reshape(ids.shape[0], -1), cases[f"{name}token_ids"])
    assert loaded.model_id == f"vqgan-{loaded.sha256[:12]}"


def test_clip_text_encoder_without_local_weights_says_what_is_needed(tmp_path):
    from enat.pipelines.text_encoder import TextEncoderUnavailable, describe

    with pytest.raises(TextEncoderUnavailable, match="needs a local Hugging Face CLIP folder"):
        describe(TextEncoderConfig(name=f"clip:{tmp_path / 'clip-vit-large-patch14'}"))
    info = describe(TextEncoderConfig(max_len=16))
    assert info["sha256"].startswith("53aa5117") and (info["dim"], info["max_len"]) == (384, 16)
