"""The `glimpse` command line's arguments: one subcommand a handler (glimpse/cli/commands.py)."""

from __future__ import annotations

import argparse

from glimpse.cli.commands import (
    cmd_ask,
    cmd_caption,
    cmd_chat,
    cmd_convert,
    cmd_data_shapes,
    cmd_data_shapes_shop,
    cmd_data_shapes_video,
    cmd_demo,
    cmd_eval,
    cmd_explain,
    cmd_generate,
    cmd_index_build,
    cmd_recommend,
    cmd_search,
    cmd_serve,
    cmd_train,
)


def _generation_args(p) -> None:
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sample")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def _at_least_one(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glimpse", description="Build, train, evaluate and serve vision-language models.")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="write data sets").add_subparsers(dest="what", required=True)
    s = data.add_parser("shapes", help="write the synthetic shapes world in real formats")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--train", type=int, default=20000)
    s.add_argument("--val", type=int, default=500)
    s.add_argument("--test", type=int, default=1000)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--shards", action="store_true",
                   help="also write WebDataset tar shards: image-caption samples, and LLaVA records (llava_SPLIT-*.tar)")
    s.set_defaults(func=cmd_data_shapes)
    s = data.add_parser("shapes-video", help="write the moving-shapes world: MP4 clips with captions, questions, "
                        "conversations")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--train", type=int, default=4000)
    s.add_argument("--val", type=int, default=200)
    s.add_argument("--test", type=int, default=500, help="clips in test and in test_novel")
    s.add_argument("--frames", type=int, default=8, help="frames a clip, 8 to 16")
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--shards", action="store_true", help="also write WebDataset shards: clips with captions, and LLaVA-Video records (llava_video_SPLIT-*.tar)")
    s.set_defaults(func=cmd_data_shapes_video)
    s = data.add_parser("shapes-shop", help="write the shapes shop: items with pictures and titles, users' purchase "
                        "histories (RecBole and MMRec files)")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--users", type=int, default=5000)
    s.add_argument("--items", type=int, default=2000)
    s.add_argument("--image-size", type=int, default=64)
    s.set_defaults(func=cmd_data_shapes_shop)

    t = sub.add_parser("train", help="train a recipe")
    t.add_argument("recipe", help="a recipe YAML file or the name of a shipped one")
    t.add_argument("--out", help="the run folder (default runs/RECIPE)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a run")
    e.add_argument("run")
    e.add_argument("--split", action="append", help="split to evaluate (repeatable; default: the recipe's)")
    e.add_argument("--json", help="also write the figures to this JSON file")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    e.add_argument("--explain", action="store_true",
                   help="score the explanation methods against the shapes world's object boxes (--split, default test)")
    e.add_argument("--n", type=int, default=200, help="--explain: scenes to explain (default 200)")
    e.add_argument("--methods", help="--explain: comma-separated methods (default all)")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("explain", help="where a run looked: a heatmap over the image, the text's tokens shaded")
    x.add_argument("run")
    x.add_argument("image")
    x.add_argument("--text", help="the text to match (dual encoders, fusion matching)")
    x.add_argument("--question", help="the question to answer (vision-language runs, fusion VQA)")
    x.add_argument("--answer", help="explain this answer instead of the one the model gives")
    x.add_argument("--method", default="chefer", help="raw, rollout, gradcam, chefer (default) or occlusion")
    x.add_argument("--out", default="heat.png", help="the picture to write (default heat.png)")
    x.add_argument("--json", action="store_true", help="print the explanation (grid, tokens) as JSON")
    x.set_defaults(func=cmd_explain)

    idx = sub.add_parser("index", help="image indexes").add_subparsers(dest="what", required=True)
    b = idx.add_parser("build", help="embed a folder of images into a searchable index")
    b.add_argument("run")
    b.add_argument("images")
    b.add_argument("--out", required=True)
    b.set_defaults(func=cmd_index_build)

    q = sub.add_parser("search", help="search an image index by text or by image")
    q.add_argument("index")
    q.add_argument("text", nargs="?")
    q.add_argument("--image", help="search by this image instead of text")
    q.add_argument("--k", type=int, default=5)
    q.add_argument("--run", help="embed queries with this run instead of the one that built the index")
    q.set_defaults(func=cmd_search)

    c = sub.add_parser("caption", help="caption images with a vision-language run")
    c.add_argument("run")
    c.add_argument("images", nargs="+")
    _generation_args(c)
    c.set_defaults(func=cmd_caption)

    k = sub.add_parser("ask", help="ask a question about an image (the answer streams)")
    k.add_argument("run")
    k.add_argument("images", nargs="+", metavar="IMAGE")
    k.add_argument("question")
    _generation_args(k)
    k.set_defaults(func=cmd_ask)

    h = sub.add_parser("chat", help="talk with a vision-language run on the terminal")
    h.add_argument("run")
    h.add_argument("--image", action="append", help="attach this image to the first message")
    _generation_args(h)
    h.set_defaults(func=cmd_chat)

    v = sub.add_parser("serve", help="serve a run over an OpenAI-compatible HTTP API with a web chat page")
    v.add_argument("run")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--device", default="cpu")
    v.add_argument("--model-name", help="the model id clients send (default: the run folder's name)")
    v.add_argument("--max-batch", type=_at_least_one, default=32, help="rows decoded together")
    v.add_argument("--max-pending", type=_at_least_one, default=32, help="requests in flight before a 429")
    v.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every /v1 request "
                   "(default: $GLIMPSE_API_KEY)")
    v.add_argument("--no-api-key", action="store_true",
                   help="serve a non-loopback address without an API key (refused otherwise)")
    v.add_argument("--allow-remote-images", action="append", default=[], metavar="HOST[,HOST]",
                   help="fetch http(s) image URLs from these hosts (public addresses only); off by default")
    v.set_defaults(func=cmd_serve)

    r = sub.add_parser("recommend", help="recommend items with a recommender run, for a known user or a history")
    r.add_argument("run")
    r.add_argument("--user", help="a user id (or index) of the run's data: after everything they bought")
    r.add_argument("--history", help="item ids (or item picture files, as new items), comma-separated, oldest first")
    r.add_argument("--k", type=int, default=10)
    r.add_argument("--search", choices=["exact", "faiss"], default="exact",
                   help="exact top-k over every item, or a FAISS inner-product index (needs faiss-cpu)")
    r.add_argument("--json", action="store_true", help="print the recommendations as JSON")
    r.set_defaults(func=cmd_recommend)

    g = sub.add_parser("generate", help="generate images from a text prompt with a text-to-image run")
    g.add_argument("run")
    g.add_argument("prompt")
    g.add_argument("--n", type=int, default=4, help="images to write (default 4)")
    g.add_argument("--out", default="generated", help="the folder the PNGs go to (default ./generated)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the run's)")
    g.add_argument("--steps", type=int, default=None, help="MaskGIT unmasking steps (default: the run's)")
    g.add_argument("--candidates", type=int, default=None,
                   help="samples per image, of which CLIP keeps the best (default: the run's)")
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--phrase-guidance", type=float, default=None,
                   help="weight of each object phrase's own guidance term (composed guidance; default: the run's)")
    g.add_argument("--device", default="cpu")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="the main job end to end on the shapes world")
    d.add_argument("which", nargs="?", choices=["all", "captioner", "t2i", "video", "recsys"], default="all",
                   help="all: the dual encoder and LLaVA (default); captioner: the encoder-decoder captioner; "
                        "t2i: text-to-image (tokenizer and MaskGIT prior); video: a video dual encoder and a "
                        "video LLaVA on the moving-shapes world; recsys: a two-tower recommender and BPR-MF on the shapes shop")
    d.add_argument("--out", default=None, help="runs/demo (captioner: runs/demo-captioner; t2i: runs/demo-t2i; "
                                               "video: runs/demo-video; recsys: runs/demo-recsys)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the demo recipe")
    d.set_defaults(func=cmd_demo)

    v = sub.add_parser("convert", help="export a glimpse run as a Hugging Face model folder, or a sharded "
                                       "(FSDP) checkpoint as one safetensors file")
    v.add_argument("src", help="a glimpse run (or one of its checkpoints)")
    v.add_argument("dst", nargs="?", default=None,
                   help="hf: the folder to write; safetensors: the file (default: model.safetensors in the "
                        "checkpoint's folder, where glimpse.load and the hf export read it)")
    v.add_argument("--to", choices=["hf", "safetensors"], required=True, help="the output format")
    v.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="weights' dtype")
    v.add_argument("--merge-lora", action="store_true", help="a LoRA run: write the model with its adapters merged "
                   "(default: the base model, and the adapters in PEFT's format in DST/adapter)")
    v.set_defaults(func=cmd_convert)
    return p
