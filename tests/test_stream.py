"""WebDataset shards as a stream (data.stream): split by process and loader worker, each sample once an
epoch, flat memory, bad members counted, exact resume, and a streamed training run resumed."""

import gzip
import json
import shutil
import tarfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tar_add, tiny_overrides
from torch.utils.data import DataLoader

from glimpse.config import load_recipe
from glimpse.data.formats import iter_webdataset
from glimpse.data.images import ImageTransform
from glimpse.data.pairs import PairCollate, StreamPairs
from glimpse.data.stream import ShardSample, ShardStream, read_shard, shard_keys
from glimpse.data.tokenizer import Tokenizer
from glimpse.distributed import shutdown_distributed
from glimpse.errors import GlimpseError
from glimpse.train.trainer import train


def _shards(folder, n_shards: int, per_shard: int) -> list[str]:
    """Shards of text-only "samples" (a tiny .png member, never decoded here, and a .txt)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        paths.append(str(folder / f"part-{s:03d}.tar"))
        with tarfile.open(paths[-1], "w") as tar:
            for i in range(per_shard):
                tar_add(tar, f"{s:03d}_{i:04d}.png", b"px")
                tar_add(tar, f"{s:03d}_{i:04d}.txt", f"caption {s} {i}".encode())
    return paths


def key_and_epoch(sample):
    return sample.key, sample.epoch


def _batches(stream: ShardStream, start: int, batch: int, workers: int, count: int) -> list:
    stream.start_at(start, batch, workers)
    # fork: a process started by mp.spawn would start its loader workers by spawning too (slow)
    loader = DataLoader(stream, batch_size=batch, num_workers=workers, collate_fn=list,
                        prefetch_factor=2 if workers else None, multiprocessing_context="fork" if workers else None)
    out = []
    for b in stream.read(loader):
        out.append(b)
        if len(out) == count:
            return out
    return out


# --- splitting: each sample once an epoch over 2 processes x 2 workers --------------------------------

def _rank_reads(rank, world, store, paths, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    stream = ShardStream(paths, key_and_epoch, seed=3, shuffle_buffer=16, epochs=2)  # rank from the group
    results[rank] = [s for b in _batches(stream, 0, 4, 2, 10**6) for s in b]
    shutdown_distributed()  # a barrier first: gloo can abort if one rank leaves while the other still talks


def test_two_processes_of_two_workers_read_each_sample_once_an_epoch(tmp_path):
    paths = _shards(tmp_path / "shards", 20, 7)
    results = mp.Manager().dict()
    mp.spawn(_rank_reads, args=(2, tmp_path / "store", paths, results), nprocs=2, join=True)
    everything = sorted(k for p in paths for k in shard_keys(p))
    assert len(everything) == 140
    for epoch in (0, 1):
        per_rank = [[k for k, e in results[r] if e == epoch] for r in (0, 1)]
        assert sorted(per_rank[0] + per_rank[1]) == everything, epoch  # each sample exactly once
        assert set(per_rank[0]).isdisjoint(per_rank[1]) and len(per_rank[0]) > 20 and len(per_rank[1]) > 20
    # epochs permute the shards among the slots and shuffle within a slot
    firsts = [[k for k, e in results[0] if e == epoch] for epoch in (0, 1)]
    assert firsts[0] != firsts[1]
    # the same split, simulated by passing rank and world size (what the trainer's processes get)
    simulated = ShardStream(paths, key_and_epoch, seed=3, shuffle_buffer=16, epochs=2, rank=1, world_size=2)
    assert [s for b in _batches(simulated, 0, 4, 2, 10**6) for s in b] == results[1]


def test_too_few_shards_for_the_slots_is_one_clear_error(tmp_path):
    paths = _shards(tmp_path / "shards", 3, 2)
    stream = ShardStream(paths, seed=0, rank=0, world_size=2)
    with pytest.raises(GlimpseError, match="3 shards cannot feed 2 process.* x 2 loader worker"):
        stream.start_at(0, 4, 2)


# --- memory -------------------------------------------------------------------------------------------

def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _fast_shard(path, shard: int, n: int) -> None:
    """A gzip-compressed shard of `n` samples of two tiny members, written as raw ustar blocks (quick)."""
    template = bytearray(tarfile.TarInfo("x" * 16).tobuf(tarfile.USTAR_FORMAT))
    blocks = []
    for i in range(n):
        for ext, data in ((b"png", b"p"), (b"txt", b"a caption")):
            header = template[:]
            header[0:16] = b"%03d_%08d." % (shard, i) + ext
            header[124:136] = b"%011o\0" % len(data)
            header[148:156] = b" " * 8
            header[148:156] = b"%06o\0 " % sum(header)
            blocks += [header, data + bytes(512 - len(data))]
    blocks.append(bytes(1024))
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(b"".join(blocks))


def key_only(sample):
    return sample.key


def test_memory_stays_flat_over_200k_samples(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    for s in range(20):
        _fast_shard(folder / f"big-{s:03d}.tar.gz", s, 10_000)
    stream = ShardStream(str(folder / "big-{000..019}.tar.gz"), key_only, seed=0, shuffle_buffer=1000, epochs=1)
    n, seen, before = 0, set(), _rss_mb()
    peak = before
    for key in stream:
        n += 1
        if n % 1000 == 0:
            seen.add(key[:3])
        if n % 20_000 == 0:
            peak = max(peak, _rss_mb())
    assert n == 200_000 and len(seen) == 20
    # holding the 200k samples (their members and keys) takes ~100 MB more (a shuffle buffer of 300k: tested)
    assert peak - before < 25, (before, peak)


# --- bad members and shards -------------------------------------------------------------------------

def test_bad_members_are_skipped_and_counted_and_a_cut_shard_is_one_line(world, tmp_path):
    png = (world / "images" / "train" / "train_000000.png").read_bytes()
    folder = tmp_path / "shards"
    folder.mkdir()
    for s in range(2):
        with tarfile.open(folder / f"d-{s}.tar", "w") as tar:
            for i in range(10):
                key = f"{s}_{i:02d}"
                bad = s == 1 and i in (3, 7)
                tar_add(tar, f"{key}.png", b"this is not a png" if bad else png)
                tar_add(tar, f"{key}.json", b"{broken" if s == 0 and i == 5 else
                     json.dumps({"captions": [f"a caption {key}"]}).encode())
            tar_add(tar, "no_image.txt", b"a caption without an image")  # not a sample at all
    tokenizer = Tokenizer(world / "tokenizer.json")
    stream = ShardStream(str(folder / "d-*.tar"), StreamPairs(ImageTransform(32), 10**7, 0), seed=0,
                         shuffle_buffer=4, epochs=1)
    stream.start_at(0, 5, 2)
    loader = DataLoader(stream, batch_size=5, num_workers=2, collate_fn=PairCollate(tokenizer, 16))
    status = [s for b in stream.read(loader) for s in b["status"]]
    assert len(status) == 20
    assert sorted(s for s in status if s) == ["corrupt", "format", "format"]  # the .json, the two images

    data = (folder / "d-1.tar").read_bytes()
    (folder / "d-1.tar").write_bytes(data[:len(data) * 2 // 3 + 100])  # cut inside a member
    stream = ShardStream(str(folder / "d-*.tar"), StreamPairs(ImageTransform(32), 10**7, 0), seed=0, epochs=1)
    stream.start_at(0, 5, 2)
    loader = DataLoader(stream, batch_size=5, num_workers=2, collate_fn=PairCollate(tokenizer, 16))
    with pytest.raises(GlimpseError) as e:
        list(stream.read(loader))
    assert str(e.value) == f"{folder / 'd-1.tar'}: not a readable tar file (unexpected end of data)"
    with pytest.raises(GlimpseError, match=r"d-1\.tar: not a readable tar file"):
        shard_keys(str(folder / "d-1.tar"))


def test_headers_alone_count_what_reading_yields_on_odd_tar_files(tmp_path):
    """pax and GNU long names, directories, __meta__ files, upper-case suffixes, samples without a caption:
    the header scan (used to skip) and the reader agree, with the in-memory reader too."""
    long = "d/" + "x" * 120
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        path = tmp_path / f"odd-{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            tar.addfile(tarfile.TarInfo("dir"))  # a regular empty file named like a folder: no suffix
            info = tarfile.TarInfo("folder/")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
            tar_add(tar, "__index__", b"meta")
            tar_add(tar, "a.PNG", b"png")
            tar_add(tar, "a.TXT", b"first")
            tar_add(tar, "b.png", b"png")  # no caption
            tar_add(tar, "b.cls", b"1")
            if fmt != tarfile.USTAR_FORMAT:
                tar_add(tar, long + ".png", b"png")
                tar_add(tar, long + ".txt", b"long")
            tar_add(tar, "c.json", json.dumps({"caption": "json only"}).encode())  # no image
            tar_add(tar, "sub/d.seg.png", b"x")  # suffix "seg.png": not an image suffix
            tar_add(tar, "sub/d.txt", b"d")
            tar_add(tar, "e.jpg", b"jpg")
            tar_add(tar, "e.json", json.dumps({"captions": ["one", "two"]}).encode())
        keys = shard_keys(str(path))
        assert keys == [k for k, _ in read_shard(str(path))]
        assert keys == ["a"] + ([long] if fmt != tarfile.USTAR_FORMAT else []) + ["e"]
        assert keys == [it.image_id for it in iter_webdataset([path])]
        assert dict(read_shard(str(path)))["e"] == {"jpg": b"jpg", "json": b'{"captions": ["one", "two"]}'}


# --- exact resume -----------------------------------------------------------------------------------

def test_a_stream_started_at_a_position_reads_what_the_uninterrupted_one_reads(tmp_path):
    paths = _shards(tmp_path / "shards", 6, 11)  # 66 samples; 3 shards a worker an epoch
    # a buffer smaller than a shard, larger than a worker's epoch (it all goes out draining), none
    for workers, buffer in ((2, 8), (0, 8), (2, 50), (2, 0)):
        straight = _batches(ShardStream(paths, key_and_epoch, seed=5, shuffle_buffer=buffer, rank=0, world_size=1),
                            0, 3, workers, 70)  # 210 samples: into the fourth epoch
        assert {e for b in straight for _, e in b} == {0, 1, 2, 3}
        starts = (1, 7, 21, 22, 35, 50, 66) if buffer == 8 else (5, 30)  # mid-buffer, mid-shard, epoch ends
        for start in starts:
            stream = ShardStream(paths, key_and_epoch, seed=5, shuffle_buffer=buffer, rank=0, world_size=1)
            assert _batches(stream, start, 3, workers, 70 - start) == straight[start:], (workers, buffer, start)


def test_a_position_saved_with_other_settings_is_refused(tmp_path):
    paths = _shards(tmp_path / "shards", 4, 3)
    stream = ShardStream(paths, seed=0, rank=0, world_size=1)
    stream.start_at(6, 4, 2)
    saved = stream.position(6)
    assert saved["batches"] == 6 and saved["workers"] == 2
    ShardStream(paths, seed=0, rank=0, world_size=1).start_at(6, 4, 2, saved)
    with pytest.raises(GlimpseError, match="saved with workers 2.*this run has workers 1"):
        ShardStream(paths, seed=0, rank=0, world_size=1).start_at(6, 4, 1, saved)


# --- training ---------------------------------------------------------------------------------------

def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _stream_data(world, tmp_path) -> dict:
    """The world's 160 training samples re-sharded into 8 shards of 20, and the --set items that stream them."""
    root = tmp_path / "data"
    (root / "shards").mkdir(parents=True)
    shutil.copy(world / "tokenizer.json", root / "tokenizer.json")
    samples = list(iter_webdataset(world / "shards" / "train-000000.tar"))
    for s in range(8):
        with tarfile.open(root / "shards" / f"train-{s:02d}.tar", "w") as tar:
            for it in samples[s * 20:(s + 1) * 20]:
                tar_add(tar, f"{it.image_id}.png", it.image)
                tar_add(tar, f"{it.image_id}.json", json.dumps({"captions": it.captions}).encode())
    return {"data.source": "wds", "data.root": str(root), "data.stream": "true",
            "data.files": "{train: 'shards/train-{00..07}.tar'}", "data.shuffle_buffer": 16, "eval.splits": "[]",
            "train.threads": 1}


def test_a_streamed_run_resumed_from_a_checkpoint_logs_the_same_losses(world, tmp_path):
    sets = tiny_overrides(world, **_stream_data(world, tmp_path), **{
        "data.num_workers": 2, "train.max_steps": 16, "train.save_every": 8, "train.keep_checkpoints": 3})
    straight = tmp_path / "straight"
    train(load_recipe("shapes-clip", sets), straight, progress=False)
    state = json.loads((straight / "checkpoints" / "step_0000008" / "state.json").read_text())
    assert state["stream"] == {"batches": 8, "batch_size": 16, "processes": 1, "workers": 2, "shards": 8,
                               "shuffle_buffer": 16, "seed": 0}
    # as if killed after the step-8 checkpoint: the later checkpoint gone, the log gone past it
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_0000016")
    train(load_recipe("shapes-clip", sets), resumed, resume=True, progress=False)
    a = [(r["step"], r["loss"]) for r in _records(straight) if "loss" in r]
    b = [(r["step"], r["loss"]) for r in _records(resumed) if "loss" in r]
    assert len(a) == 16 and a == b  # 256 samples: the stream went on into its second epoch

    with pytest.raises(GlimpseError, match="data.stream.*resume with the same"):
        train(load_recipe("shapes-clip", sets + ["data.num_workers=1", "train.max_steps=24"]), resumed,
              resume=True, progress=False)


@pytest.mark.parametrize("family", ["encoder_decoder", "fusion", "vlm"])
def test_the_other_caption_families_train_on_a_stream(world, tmp_path, family):
    from conftest import tiny_vlm_overrides
    from test_captioner import tiny_captioner_overrides
    from test_fusion import tiny_overrides as fusion_overrides

    extra = {**_stream_data(world, tmp_path), "train.max_steps": 2, "train.save_every": 2}
    name, sets = {"encoder_decoder": ("shapes-captioner", tiny_captioner_overrides(world, **extra)),
                  "fusion": ("shapes-fusion-pretrain", fusion_overrides(world, **extra)),
                  "vlm": ("shapes-llava-stage1", tiny_vlm_overrides(
                      world, **extra, **{"train.cache_vision_features": "false"}))}[family]
    train(load_recipe(name, sets), tmp_path / "run", progress=False)
    assert len([r for r in _records(tmp_path / "run") if "loss" in r]) == 2
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_0000002" / "state.json").read_text())
    assert state["stream"]["batches"] == 2


def test_llava_record_shards_stream_the_items_the_json_file_gives(world, tmp_path, capsys):
    """Stage 2 from shards: `glimpse data shapes --shards` writes the LLaVA records as shards (each sample an image
    and its record as the .json, as LLaVA-style WebDataset sets hold them); each streamed sample is the item
    ConversationDataset makes of the same record read from the LLaVA file; a record that is not LLaVA's is a
    bad sample, counted; and a run trains on the stream."""
    from conftest import tiny_vlm_overrides

    from glimpse.data.conversations import ConversationDataset, llava_records, stream_conversations
    from glimpse.models.vlm import VisionLanguageModel

    root = tmp_path / "data"
    (root / "shards").mkdir(parents=True)
    shutil.copy(world / "tokenizer.json", root / "tokenizer.json")
    for shard in (world / "shards").glob("llava_train-*.tar"):
        shutil.copy(shard, root / "shards" / shard.name)
    sets = {"data.source": "wds", "data.format": "llava", "data.vqa_mix": "false", "data.root": str(root),
            "data.stream": "true", "data.files": "{train: 'shards/llava_train-*.tar'}", "data.shuffle_buffer": 8,
            "eval.splits": "[]", "train.threads": 1, "train.cache_vision_features": "false"}
    recipe = load_recipe("shapes-llava-stage2", tiny_vlm_overrides(world, **sets))
    tok = Tokenizer(world / "tokenizer.json")
    transform = ImageTransform(32, recipe.data.image_mean, recipe.data.image_std)
    tokens = VisionLanguageModel.count_image_tokens(recipe.model)
    ids = [r["id"] for r in json.loads((world / "annotations" / "llava_train.json").read_text())]
    whole = llava_records(recipe.data.__class__(source="shapes", format="llava"), world, "train")
    dataset = ConversationDataset(whole, tok, recipe.model.chat_template, transform, 10**8, tokens,
                                  recipe.model.lm.context_length)
    stream = stream_conversations(recipe.data, root, tok, recipe.model.chat_template, transform, tokens,
                                  recipe.model.lm.context_length, seed=0)

    def decoded(path):
        return {key: stream.decode(ShardSample(path, key, files, 0)) for key, files in read_shard(path)}

    got = {k: v for path in stream.paths for k, v in decoded(path).items()}
    assert sorted(got) == sorted(ids) and len(ids) > 160  # every record, several an image
    for i, key in enumerate(ids):
        want = dataset[(i, 0)]
        assert got[key]["input_ids"] == want["input_ids"] and got[key]["labels"] == want["labels"], key
        assert torch.equal(got[key]["pixel_values"][0], want["pixel_values"][0]), key

    # a record whose turns place no image gets it before the first turn, as LLaVA (and the JSON file's reader)
    # do; records that are not LLaVA's, or that name other than one image, are bad samples, one line each,
    # counted, and training goes on; a sample with no image member is not a sample of the stream
    last = stream.paths[-1]
    png = (world / "images" / "train" / "train_000000.png").read_bytes()
    turns = [{"from": "human", "value": "what colour is the shape?"}, {"from": "gpt", "value": "red"}]
    with tarfile.open(last, "a") as tar:
        for key, body in (("unplaced", {"image": "x.png", "conversations": turns}), ("nojson", b"{not json"),
                          ("noturns", {"id": "x"}), ("badturn", {"conversations": [{"from": "robot", "value": "hi"}]}),
                          ("twoimages", {"images": ["a.png", "b.png"], "conversations": turns})):
            tar_add(tar, f"{key}.png", png)
            tar_add(tar, f"{key}.json", body if isinstance(body, bytes) else json.dumps(body).encode())
        tar_add(tar, "textonly.json", json.dumps({"conversations": turns}).encode())
    streamed = decoded(last)
    assert "textonly" not in streamed
    placed = [{"role": "user", "content": "<image>\nwhat colour is the shape?"}, {"role": "assistant", "content": "red"}]
    want = ConversationDataset([{"images": [png], "messages": placed}], tok, recipe.model.chat_template, transform,
                               10**8, tokens, recipe.model.lm.context_length)[(0, 0)]
    assert streamed["unplaced"]["input_ids"] == want["input_ids"] and streamed["unplaced"]["labels"] == want["labels"]
    bad = [streamed[k] for k in ("nojson", "noturns", "badturn", "twoimages")]
    assert [b["error"] for b in bad] == ["corrupt", "format", "format", "format"]
    assert "names 2 images" in bad[3]["message"]
    assert all(f"{last.rsplit('/', 1)[-1]}:" in b["message"] and "\n" not in b["message"] for b in bad)
    out = tmp_path / "run"
    more = {"train.max_steps": 8, "train.save_every": 8, "train.batch_size": 48}  # past the end: the bad ones too
    train(load_recipe("shapes-llava-stage2", tiny_vlm_overrides(world, **sets, **more)), out, progress=False)
    assert len([r for r in _records(out) if "loss" in r]) == 8
    assert "skipped bad samples" in capsys.readouterr().out


def test_recipes_refuse_a_stream_where_it_cannot_be_read():
    with pytest.raises(GlimpseError, match="data.stream.*data.source: wds"):
        load_recipe("shapes-clip", ["data.stream=true"])
    with pytest.raises(GlimpseError, match=r"data.stream.*families that read a stream \(.*dual_encoder.*\), not causal_lm"):
        load_recipe("shapes-lm", ["data.source=wds", "data.stream=true"])
    with pytest.raises(GlimpseError, match="data.stream.*not for model.objective vqa"):
        load_recipe("shapes-fusion-vqa", ["data.source=wds", "data.stream=true", "init=null"])
    with pytest.raises(GlimpseError, match="data.stream.*not with data.vqa_mix"):
        load_recipe("shapes-llava-stage2", ["data.source=wds", "data.stream=true", "init=null",
                                            "train.cache_vision_features=false"])
    with pytest.raises(GlimpseError, match="data.format.*set data.stream true"):
        load_recipe("shapes-llava-stage2", ["data.source=wds", "data.vqa_mix=false", "init=null"])
    with pytest.raises(GlimpseError, match="cache_vision_features.*not with data.stream"):
        load_recipe("shapes-llava-stage1", ["data.source=wds", "data.stream=true"])
