"""The vq family: parity with diffusers' VQModel through a saved folder, `glimpse convert` to a folder
diffusers loads, refused folders, the VQ loss's gradients (taming's legacy=False), k-means
initialisation and dead-code restarts, and a tiny training run that evaluates and reconstructs."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import glimpse
from glimpse.errors import GlimpseError
from glimpse.families.base import vq_transform
from glimpse.families.vq.model import VQTokenizer, VQTokenizerConfig
from glimpse.models.vq import VQConfig, VQModel

diffusers = pytest.importorskip("diffusers")

DOWN, UP = "DownEncoderBlock2D", "UpDecoderBlock2D"
WEIGHTS = "diffusion_pytorch_model.safetensors"
TINY = [  # (block_out_channels, layers_per_block, vq_embed_dim, mid_block_add_attention)
    ([8, 16], 1, None, True),
    ([8, 8, 16, 16], 2, 3, False),
]


def diffusers_vq(channels, layers, embed, attention, seed=0):
    torch.manual_seed(seed)
    n = len(channels)
    model = diffusers.VQModel(in_channels=3, out_channels=3, down_block_types=[DOWN] * n, up_block_types=[UP] * n,
                              block_out_channels=channels, layers_per_block=layers, latent_channels=4,
                              sample_size=16, num_vq_embeddings=16, norm_num_groups=8, vq_embed_dim=embed,
                              mid_block_add_attention=attention, lookup_from_codebook=True)
    with torch.no_grad():  # codes spread like the latents (the default init packs them near 0), norms not identity
        model.quantize.embedding.weight.normal_(0, 0.5)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = []
    for i, args in enumerate(TINY):
        d = tmp_path_factory.mktemp("diffusers") / f"vq{i}"
        diffusers_vq(*args, seed=i).save_pretrained(d)
        out.append(d)
    return out


def images(n=2, size=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy())
            for _ in range(n)]


@pytest.mark.parametrize("which", range(len(TINY)))
def test_diffusers_folder_loads_and_agrees(folders, which):
    folder = folders[which]
    theirs = diffusers.VQModel.from_pretrained(folder).eval()
    pipe = glimpse.load(folder)
    ours = pipe.model
    assert isinstance(ours, VQModel) and ours.cfg.embed_dim == (TINY[which][2] or 4)
    pics = images()
    pixels = torch.stack([vq_transform(ours.cfg)(im) for im in pics])  # [-1, 1] at sample_size
    assert pixels.shape == (2, 3, 16, 16) and pixels.min() >= -1 and pixels.max() <= 1
    with torch.no_grad():
        want = theirs.encode(pixels).latents
        torch.testing.assert_close(ours.encode(pixels), want, rtol=1e-5, atol=1e-5)
        B, C, h, w = want.shape
        _, _, (_, _, argmin) = theirs.quantize(want)
        tokens = pipe.tokens(pics)  # the pipeline, from the images themselves
        assert tokens.shape == (B, h, w) and torch.equal(tokens.flatten(), argmin)
        assert len(tokens.unique()) > 1
        decoded = theirs.decode(tokens.flatten(), force_not_quantize=True, shape=(B, h, w, C)).sample
        torch.testing.assert_close(ours.decode_tokens(tokens), decoded, rtol=1e-5, atol=1e-5)
    out = pipe.reconstruct(pics)
    assert [im.size for im in out] == [(16, 16)] * 2


def test_export_is_a_diffusers_folder(tiny_vq_run, world, tmp_path):
    from glimpse.cli import main

    dst = tmp_path / "hf"
    main(["convert", str(tiny_vq_run), str(dst), "--to", "hf"])
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", WEIGHTS]  # no tokenizer files
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    config = json.loads((dst / "config.json").read_text())
    init = set(inspect.signature(diffusers.VQModel.__init__).parameters) - {"self"}
    assert set(config) == init | {"_class_name", "_diffusers_version"}
    assert config["_class_name"] == "VQModel" and config["lookup_from_codebook"] is True
    assert config["norm_type"] == "group" and config["force_upcast"] is False
    assert config["down_block_types"] == [DOWN] * 4 and config["up_block_types"] == [UP] * 4
    assert config["vq_embed_dim"] == 4 and config["latent_channels"] == 8

    theirs = diffusers.VQModel.from_pretrained(dst).eval()
    tensors = load_file(dst / WEIGHTS)
    assert set(tensors) == set(theirs.state_dict())  # diffusers' names exactly: no `vq.`, no training buffers

    pipe = glimpse.load(tiny_vq_run)
    paths = sorted((world / "images" / "test").glob("*.png"))[:3]
    tokens = pipe.tokens(paths)
    B, h, w = tokens.shape
    with torch.no_grad():
        want = theirs.decode(tokens.flatten(), force_not_quantize=True, shape=(B, h, w, 4)).sample
        torch.testing.assert_close(pipe.model.decode_tokens(tokens), want, rtol=1e-5, atol=1e-5)
        pixels = pipe._pixels(paths)
        _, _, (_, _, argmin) = theirs.quantize(theirs.encode(pixels).latents)
    assert torch.equal(argmin, tokens.flatten())
    back = glimpse.load(dst)  # and glimpse reads its own export
    assert torch.equal(back.tokens(paths), tokens)


def _edit(src, dst, config=None, drop=None, add=None):
    dst.mkdir()
    c = json.loads((src / "config.json").read_text())
    c.update(config or {})
    (dst / "config.json").write_text(json.dumps(c))
    t = load_file(src / WEIGHTS)
    if drop:
        del t[drop]
    t.update(add or {})
    save_file(t, str(dst / WEIGHTS))
    return dst


@pytest.mark.parametrize("config, drop, add, message", [
    ({"norm_type": "spatial"}, None, None, "norm_type 'spatial'"),
    ({"act_fn": "gelu"}, None, None, "act_fn 'gelu'"),
    ({"down_block_types": [DOWN, "AttnDownEncoderBlock2D"]}, None, None, "AttnDownEncoderBlock2D"),
    ({"up_block_types": [UP]}, None, None, "2 down blocks, 1 up blocks"),
    ({"_class_name": "AutoencoderKL"}, None, None, "_class_name 'AutoencoderKL'"),
    ({"block_out_channels": [8, 32]}, None, None, "encoder.down_blocks.1"),  # shapes checked before loading
    ({}, "decoder.up_blocks.1.resnets.0.conv2.weight", None, "missing tensor decoder.up_blocks.1.resnets.0.conv2"),
    ({}, None, {"quantize.extra": torch.zeros(2)}, "unexpected tensor quantize.extra"),
])
def test_bad_folders_are_one_line_errors(folders, tmp_path, config, drop, add, message):
    bad = _edit(folders[0], tmp_path / "bad", config, drop, add)
    with pytest.raises(GlimpseError) as e:
        glimpse.load(bad)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_vq_loss_gradients_are_taming_legacy_false():
    """beta * |z - sg(e)|^2 + |sg(z) - e|^2, means over the 4 numbers of z [1, 2, 1, 2]: z gets
    beta * 2 (z - e) / 4, the codebook 2 (e - z) / 4; the codes pass z's gradient straight through."""
    vq = VQModel(VQConfig(block_out_channels=[8], norm_num_groups=8, latent_channels=2, num_vq_embeddings=3,
                          beta=0.25))
    with torch.no_grad():
        vq.quantize.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [-1.0, 0.0]]))
    z = torch.tensor([[[[0.5, -1.0]], [[1.0, 0.2]]]], requires_grad=True)  # positions (0.5, 1) and (-1, 0.2)
    z_q, loss, indices = vq.quantize_latents(z)
    assert indices.tolist() == [[[1, 2]]]
    torch.testing.assert_close(z_q.detach(), torch.tensor([[[[1.0, -1.0]], [[1.0, 0.0]]]]))
    torch.testing.assert_close(loss.detach(), torch.tensor(1.25 * (0.25 + 0.04) / 4))
    loss.backward()
    # z - e: (-0.5, 0) and (0, 0.2); times 0.25 * 2 / 4 = 0.125
    torch.testing.assert_close(z.grad, torch.tensor([[[[-0.0625, 0.0]], [[0.0, 0.025]]]]))
    # e - z: (0.5, 0) at code 1, (0, -0.2) at code 2, times 2 / 4; code 0 is unused
    torch.testing.assert_close(vq.quantize.embedding.weight.grad, torch.tensor([[0.0, 0.0], [0.25, 0.0], [0.0, -0.1]]))
    z.grad = None
    z_q, _, _ = vq.quantize_latents(z)
    (z_q * torch.arange(4.0).view(1, 2, 1, 2)).sum().backward()  # straight through: z gets z_q's gradient
    torch.testing.assert_close(z.grad, torch.arange(4.0).view(1, 2, 1, 2))


def tiny_tokenizer(K, restart_after=50):
    vq = VQConfig(block_out_channels=[8], norm_num_groups=8, latent_channels=2, num_vq_embeddings=K)
    return VQTokenizer(VQTokenizerConfig(vq=vq, restart_after=restart_after, kmeans_iters=20))


@pytest.mark.parametrize("seed", range(8))  # a plain random start fails for seed 0 (two codes in one cluster)
def test_kmeans_puts_a_code_on_each_cluster(seed):
    centres = torch.tensor([[5.0, 5.0], [-5.0, 5.0], [0.0, -5.0]])
    g = torch.Generator().manual_seed(seed)
    points = (centres[:, None] + 0.1 * torch.randn(3, 40, 2, generator=g)).reshape(-1, 2)
    tok = tiny_tokenizer(3)
    tok.kmeans_init(points[torch.randperm(120, generator=g)], seed=seed)
    codes = tok.vq.quantize.embedding.weight
    assert bool(tok.initialised)
    assert torch.cdist(centres, codes).min(1).values.max() < 0.1, codes


def test_dead_code_restarts_on_the_worst_latent():
    tok = tiny_tokenizer(3, restart_after=2)
    with torch.no_grad():
        tok.vq.quantize.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, -10.0]]))

    def step(points):
        z = torch.tensor(points).t().reshape(1, 2, 1, len(points))
        return tok.restart_dead_codes(z, tok.vq.quantize.indices(z)).flatten().tolist()

    assert step([[0.1, 0.0], [9.0, 10.0]]) == [0, 1]  # code 2 idle one step: kept
    assert tok.idle_steps.tolist() == [0, 0, 1] and int(tok.restarts) == 0
    # code 2 idle a second step: restarted onto (3, -3), the latent quantised worst (error 18, vs 0.01 and 1)
    assert step([[0.1, 0.0], [9.0, 10.0], [3.0, -3.0]]) == [0, 1, 2]
    torch.testing.assert_close(tok.vq.quantize.embedding.weight[2].detach(), torch.tensor([3.0, -3.0]))
    assert tok.idle_steps.tolist() == [0, 0, 0] and int(tok.restarts) == 1
    tok.cfg.restart_after = 0  # 0: never
    for _ in range(3):
        step([[0.1, 0.0]])
    assert int(tok.restarts) == 1


def test_product_quantisation_codes_each_slice_from_its_own_codebook():
    """codebook_groups = 2: a 4-d latent is two 2-d slices, each quantised by its own codebook of K; the
    indices are local per group [B, H, W, G], the lookup puts the slices' codes side by side, and flat
    tokens (a position's codes together) decode as the grid does."""
    vq = VQModel(VQConfig(block_out_channels=[8], norm_num_groups=8, latent_channels=4, num_vq_embeddings=3,
                          codebook_groups=2, sample_size=2))
    q = vq.quantize
    assert q.embedding.weight.shape == (6, 2) and vq.cfg.tokens_per_image == 2 * 2 * 2
    with torch.no_grad():
        q.codebook(0).copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]))
        q.codebook(1).copy_(torch.tensor([[-1.0, 0.0], [0.0, -1.0], [5.0, 5.0]]))
    z = torch.tensor([[1.1, 0.9, 0.1, -0.9], [2.0, 2.1, -1.0, 0.1]]).t().reshape(1, 4, 1, 2)  # 2 positions
    ids = q.indices(z)
    assert ids.shape == (1, 1, 2, 2) and ids[0, 0].tolist() == [[1, 1], [2, 0]]
    codes = q.lookup(ids)
    torch.testing.assert_close(codes[0, :, 0].t(), torch.tensor([[1.0, 1.0, 0.0, -1.0], [2.0, 2.0, -1.0, 0.0]]))
    grid = torch.randint(0, 3, (2, 2, 2, 2))
    with torch.no_grad():
        torch.testing.assert_close(vq.decode_tokens(grid.flatten(1)), vq.decode_tokens(grid))
        with pytest.raises(ValueError, match=r"\[B, h, w, 2\]"):  # one code a position is not this tokenizer's
            vq.decode_tokens(grid[..., 0])
    with pytest.raises(ValueError, match="codebook_groups"):
        VQModel(VQConfig(latent_channels=4, block_out_channels=[8], norm_num_groups=8, codebook_groups=3))


def test_product_quantisation_kmeans_and_restarts_per_group():
    vq = VQConfig(block_out_channels=[8], norm_num_groups=8, latent_channels=4, num_vq_embeddings=2, codebook_groups=2)
    tok = VQTokenizer(VQTokenizerConfig(vq=vq, restart_after=1, kmeans_iters=10))
    assert tok.idle_steps.shape == (4,)
    # slice 0 in two clusters at (+-5, 0), slice 1 in two at (0, +-7): each group's codes on its own clusters
    g = torch.Generator().manual_seed(0)
    s0 = torch.tensor([[5.0, 0.0], [-5.0, 0.0]])[torch.arange(40) % 2] + 0.1 * torch.randn(40, 2, generator=g)
    s1 = torch.tensor([[0.0, 7.0], [0.0, -7.0]])[torch.arange(40) // 20] + 0.1 * torch.randn(40, 2, generator=g)
    tok.kmeans_init(torch.cat([s0, s1], 1), seed=0)
    q = tok.vq.quantize
    assert sorted(q.codebook(0)[:, 0].round().tolist()) == [-5.0, 5.0]
    assert sorted(q.codebook(1)[:, 1].round().tolist()) == [-7.0, 7.0]
    # one step where group 1's code for (0, -7) goes unchosen: it alone moves, onto the worst slice-1 latent
    z = torch.tensor([[5.0, 0.0, 0.0, 7.0], [-5.0, 0.0, 3.0, 3.0]]).t().reshape(1, 4, 1, 2)
    before = q.embedding.weight.detach().clone()
    ids = tok.restart_dead_codes(z, q.indices(z))
    moved = (q.embedding.weight != before).any(1).nonzero().flatten().tolist()
    assert len(moved) == 1 and moved[0] >= 2 and int(tok.restarts) == 1  # a group-1 code
    torch.testing.assert_close(q.embedding.weight[moved[0]].detach(), torch.tensor([3.0, 3.0]))
    assert ids[0, 0, 1].tolist() == [int(q.codebook(0)[:, 0].argmin()), moved[0] - 2]  # (-5, 0), the moved code


def test_product_quantised_tokenizer_has_no_diffusers_form(tmp_path):
    from glimpse.families.vq.hf import to_hf_folder

    vq = VQModel(VQConfig(block_out_channels=[8], norm_num_groups=8, latent_channels=4, codebook_groups=2))
    with pytest.raises(GlimpseError, match="codebook_groups 2"):
        to_hf_folder(vq)


def test_tiny_run_trains_evaluates_and_reconstructs(tiny_vq_run, world):
    from glimpse.api import load_run

    metrics = [json.loads(line) for line in (tiny_vq_run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m for m in metrics)
    family, model = load_run(tiny_vq_run)
    assert bool(model.initialised)  # k-means ran before the first step
    family.root = world
    figures = family.evaluate(model, ["test"])
    assert {"test/recon_exact", "test/codebook_usage", "test/psnr"} <= set(figures)
    assert figures["test/n"] == 8 and 0 < figures["test/codebook_usage"] <= 1 and figures["test/psnr"] > 0
    pipe = glimpse.load(tiny_vq_run)
    path = sorted((world / "images" / "test").glob("*.png"))[0]
    out = pipe.reconstruct([path])
    assert len(out) == 1 and isinstance(out[0], Image.Image) and out[0].size == Image.open(path).size == (32, 32)
    assert pipe.tokens([path]).shape == (1, 4, 4)


def test_image_shards_stream_for_the_tokenizer(world, tmp_path, capsys):
    """The tokenizer from streamed image shards, captioned or not (ImageNet-style KEY.png + KEY.cls): each streamed
    image is PairDataset's; k-means reads only the first model.kmeans_images; a corrupt image is counted."""
    import tarfile

    from conftest import tar_add, tiny_vq_overrides

    from glimpse.config import load_recipe
    from glimpse.data.formats import ImageText
    from glimpse.data.pairs import PairDataset, StreamImages, first_images, image_usable
    from glimpse.data.stream import ShardSample, read_shard
    from glimpse.train.trainer import train

    paths = sorted((world / "images" / "train").glob("*.png"))[:64]
    root = tmp_path / "data"
    (root / "shards").mkdir(parents=True)
    (root / "tokenizer.json").write_bytes((world / "tokenizer.json").read_bytes())

    for k in range(4):
        with tarfile.open(root / "shards" / f"train-{k}.tar", "w") as tar:
            for p in paths[k * 16:(k + 1) * 16]:
                tar_add(tar, f"{p.stem}.png", p.read_bytes())
                tar_add(tar, f"{p.stem}.cls", b"3")
            if k == 3:
                tar_add(tar, "broken.png", paths[0].read_bytes()[:60])
    sets = {"data.source": "wds", "data.stream": "true", "data.root": str(root), "data.shuffle_buffer": 8,
            "data.files": "{train: 'shards/train-{0..3}.tar'}", "eval.splits": "[]", "eval.during_train": "[]",
            "train.threads": 1, "model.kmeans_images": 20, "train.max_steps": 9, "train.save_every": 9}
    recipe = load_recipe("shapes-vq", tiny_vq_overrides(world, **sets))
    transform = vq_transform(recipe.model.vq)
    whole = PairDataset([ImageText(str(p), ["x"], p.stem) for p in paths], transform, recipe.data.max_pixels)
    decode = StreamImages(transform, recipe.data.max_pixels)
    got = {key: decode(ShardSample(str(t), key, files, 0)) for t in sorted((root / "shards").glob("*.tar"))
           for key, files in read_shard(str(t), image_usable)}
    assert len(got) == 65 and got["broken"]["error"] == "truncated" and "train-3.tar:broken" in got["broken"]["message"]
    assert all(torch.equal(got[p.stem]["pixel_values"], whole[(i, 0)]["pixel_values"]) for i, p in enumerate(paths))
    assert first_images(recipe.data, root, 20) == [p.read_bytes() for p in paths[:20]]

    out = tmp_path / "run"
    train(recipe, out, progress=False)  # 9 x 8 = 72 samples: past the end of the first epoch
    assert "skipped bad samples" in capsys.readouterr().out
    from glimpse.api import load_run

    _, model = load_run(out)
    assert bool(model.initialised)
    state = json.loads((out / "checkpoints" / "step_0000009" / "state.json").read_text())
    assert state["stream"]["batches"] == 9


def test_foreground_weight_weighs_saturated_pixels():
    tok = VQTokenizer(VQTokenizerConfig(vq=VQConfig(block_out_channels=[8], norm_num_groups=8, latent_channels=2,
                                                    num_vq_embeddings=4, sample_size=4),
                                        foreground_weight=3.0, restart_after=0)).eval()
    pixels = torch.full((1, 3, 4, 4), 0.8)
    pixels[0, :, 0, 0] = torch.tensor([1.0, -1.0, -1.0])  # one saturated pixel: saturation (1 - -1) / 2 = 1
    with torch.no_grad():
        z = tok.vq.encode(pixels)
        z_q, vq_loss, _ = tok.vq.quantize_latents(z)
        err = tok.vq.decode_latents(z_q) - pixels
        weight = torch.ones(1, 1, 4, 4)
        weight[0, 0, 0, 0] = 4.0
        weight = weight / weight.mean()
        expected = (err * weight).abs().mean() + (err * weight).pow(2).mean() + vq_loss
        torch.testing.assert_close(tok.loss(pixels), expected)


def test_autoencoder_warm_up_then_codes_from_its_latents():
    """quantize_after = 2: two batches reconstruct the unquantised latents (no VQ term) and bank them; the
    third runs the k-means on the bank, then quantises; a copy with the same state continues identically."""
    vq = VQConfig(block_out_channels=[8], norm_num_groups=8, latent_channels=2, num_vq_embeddings=4, sample_size=4)
    tok = VQTokenizer(VQTokenizerConfig(vq=vq, quantize_after=2, kmeans_images=8, restart_after=0)).train()
    assert tok.latent_bank.shape == (8 * 16, 2)  # 8 images' worth of 4 x 4 latents
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(4, 3, 4, 4, generator=g) * 2 - 1 for _ in range(4)]
    for i, pixels in enumerate(batches[:2]):
        with torch.no_grad():
            z = tok.vq.encode(pixels)
            expected = tok.reconstruction_loss(tok.vq.decode_latents(z), pixels)
        torch.testing.assert_close(tok.loss(pixels), expected)  # no quantiser, no VQ loss
        assert not bool(tok.initialised) and int(tok.bank_filled) == 64 * (i + 1)
    bank = tok.latent_bank[:128].clone()
    torch.testing.assert_close(bank[64:], tok.vq.encode(batches[1]).permute(0, 2, 3, 1).reshape(-1, 2).detach())
    twin = VQTokenizer(tok.cfg).train()
    twin.load_state_dict(tok.state_dict())  # a resumed run: the bank and the count are in the state
    reference = VQTokenizer(tok.cfg)
    reference.kmeans_init(bank, seed=2)
    losses = [tok.loss(batches[2]), twin.loss(batches[2])]
    assert bool(tok.initialised)
    torch.testing.assert_close(tok.vq.quantize.embedding.weight, reference.vq.quantize.embedding.weight)
    torch.testing.assert_close(losses[0], losses[1])
    with torch.no_grad():  # now the VQ loss is in
        z = tok.vq.encode(batches[3])
        z_q, vq_loss, _ = tok.vq.quantize_latents(z)
        expected = tok.reconstruction_loss(tok.vq.decode_latents(z_q), batches[3]) + vq_loss
    torch.testing.assert_close(tok.loss(batches[3]), expected)
    plain = VQTokenizer(VQTokenizerConfig(vq=vq))
    assert "latent_bank" not in plain.state_dict()  # runs without a warm-up keep their old keys
